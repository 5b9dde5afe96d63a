"""``mergescope regress RUN_DIR``: regression alignment of B onto A for a finished probe/demo run folder
(issue 5, items 2 and 4), mirroring :func:`mergescope.comparison.compare_run`.

Fits every group of A on the same layer of B (unaligned: the map needs no permutation) over the fixed subset
(5 images per class), sweeps the sparsity, ranks the dataset's images by every regressed B channel in one pass
(:func:`mergescope.align.regressed_topk.regressed_topk`), and writes ``regression.csv`` (layer, channel, m, refit,
r2, recovered), ``figures/regression.png``, the hard channels' feature pages (``features/regress_*.html``) and the
"Regression alignment" section of ``report.html``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .align.covariance import group_covariances
from .align.regressed_topk import hard_channels, regressed_topk, single_weight_fits, summary_rows
from .align.regression import DEFAULT_FRACTIONS, regression_from_stats, regression_subset
from .comparison import _checkpoints, _write_rows
from .data import iter_batches, len_batches, open_dataset
from .errors import MergescopeError
from .report.regression_pages import FIGURE, plot_regression, regression_section_html, render_regression_pages

SECTION_TITLE = "Regression alignment"
CSV_NAME = "regression.csv"
COLUMNS = ("layer", "channel", "m", "refit", "r2", "recovered")


@dataclass
class RegressConfig:
    """How to regress (recorded in the run's manifest)."""

    per_class: int = 5  # fitting subset: images per class
    ridge: float = 0.0  # relative ridge λ
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS  # sparsity sweep (m as a fraction of B's channels)
    sparse_fraction: float = 0.05  # "needs many weights": R²(all) − R²(this, refit)
    hard_n: int = 10  # hard channels shown per layer
    k: int = 10  # top-k images per channel
    reduction: str = "max"
    batch_size: int = 256


def _nan_none(v: float):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def regress_run(run_dir: str | os.PathLike, config: RegressConfig | None = None, *,
                device: torch.device | str = "cpu", progress: bool = False, overwrite: bool = False) -> dict:
    """The regression study of a run folder; returns the JSON recorded under ``results.json["regression"]``."""
    from .perm import build_spec
    from .runs import add_to_run, load_run
    from .train import load_checkpoint

    cfg = config or RegressConfig()
    run_dir = Path(run_dir)
    results, manifest = load_run(run_dir)
    features = results.get("features")
    if not features:
        raise MergescopeError(f"{run_dir} holds no feature study (no 'features' in results.json); "
                              "make one with `mergescope probe` or `mergescope demo`")
    if (run_dir / CSV_NAME).exists() and not overwrite:
        raise MergescopeError(f"{run_dir} already holds a regression study ({CSV_NAME}); pass --overwrite to replace it")
    start = time.perf_counter()
    timings = {}
    dataset = open_dataset(features["data"], split=features["split"])
    paths = _checkpoints(run_dir, manifest, ["A", "B"])
    if "A" not in paths or "B" not in paths:
        raise MergescopeError(f"{run_dir}'s manifest lists fewer than two checkpoints")
    a = load_checkpoint(paths["A"], device=device)[0].eval()
    b = load_checkpoint(paths["B"], device=device)[0].eval()
    spec = build_spec(a, next(iter(iter_batches(dataset, 2))).x.to(device))

    t0 = time.perf_counter()
    ids = regression_subset(dataset, cfg.per_class)
    [stats] = group_covariances(a, [b], spec, iter_batches(dataset, cfg.batch_size, ids=ids), device=device,
                                progress=progress)
    res = regression_from_stats(stats, cfg.ridge, cfg.fractions)
    for g in res.fits:  # m = 1 exactly (the smallest fraction may keep more weights in wide layers)
        res.sweep[g] = [*single_weight_fits(stats[g], res.fits[g]), *res.sweep.get(g, [])]
    timings["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tops = regressed_topk(a, b, spec, res, iter_batches(dataset, cfg.batch_size), k=cfg.k, reduction=cfg.reduction,
                          device=device, progress=progress, total=len_batches(dataset, cfg.batch_size))
    timings["top-k pass"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows = [{"layer": gt.layer, "channel": c, "m": mp.m, "refit": mp.refit, "r2": _nan_none(float(mp.r2[c])),
             "recovered": _nan_none(float(mp.recovered[c]))}
            for gt in tops.values() for mp in gt.maps.values() for c in range(len(mp.r2))]
    csv_path = _write_rows(run_dir / CSV_NAME, rows, COLUMNS)
    summary = summary_rows(tops)
    hard = {gt.layer: hard_channels(gt, cfg.sparse_fraction, cfg.hard_n) for gt in tops.values()}
    figure = plot_regression(summary, run_dir / FIGURE)
    pages = render_regression_pages(run_dir, dataset, tops, hard, cfg.sparse_fraction)
    info = {"subset": len(ids), "per_class": cfg.per_class, "reduction": cfg.reduction, "images": len(dataset),
            "dataset": f"{features['data']} ({features['split']})", "k": cfg.k,
            "first_observation": any(len(spec.groups[g].observe) > 1 for g in tops),
            "sparse_label": f"{cfg.sparse_fraction * 100:g}% refit", "hard_n": cfg.hard_n}
    html = regression_section_html(summary, hard, pages, FIGURE, CSV_NAME, info)
    timings["report"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start

    out = {"summary": summary, "hard_channels": hard, "pages": pages, "samples": res.samples,
           "layers": {g: gt.layer for g, gt in tops.items()}, "config": dataclasses.asdict(cfg), "timings": timings}
    results["regression"] = out
    add_to_run(run_dir, results, manifest, {"title": SECTION_TITLE, "html": html},
               [csv_path, figure, *(run_dir / p["href"] for p in pages)], "regression",
               {"config": dataclasses.asdict(cfg), "timings": timings})
    return out


__all__ = ["COLUMNS", "SECTION_TITLE", "RegressConfig", "regress_run"]
