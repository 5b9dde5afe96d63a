"""``mergescope regress RUN_DIR``: regression alignment of B onto A for a finished probe/demo run folder
(issue 5, items 2 and 4), mirroring :func:`mergescope.studies.compare.run_folder`.

Fits every group of A on the same layer of B (unaligned: the map needs no permutation) over the fitting subset F
(the thesis's 5,000 images, class-stratified, capped by the dataset; a residual stream pooled over all its layers),
sweeps the sparsity, judges every map's R² on a disjoint held-out subset H (5,000 images, at most a fifth of the
dataset: :func:`mergescope.align.regression.regression_subsets`), ranks every image outside F by every regressed B
channel at every observation point in one pass (:func:`mergescope.align.regressed_topk.regressed_topk`; A's top-k
over the same images), and writes ``regression.csv`` (layer, channel, m, refit, r2_heldout, r2_in_sample,
recovered; one block per observation point), ``regression_topk.json`` (the hard channels' top-k images),
``figures/regression.svg``, the hard channels' feature pages (``features/regress_*.html``) and the
"Regression alignment" section of ``report.html``. The last three are rendered from what is stored
(:func:`render_regression`), so ``mergescope report`` re-renders them without a model.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..runs.csvio import write_rows
from ..runs.jsonio import write_json
from ..align.covariance import group_covariances
from ..align.regressed_topk import hard_channels, regressed_topk, single_weight_fits, summary_rows
from ..align.regression import (DEFAULT_FRACTIONS, FIT_IMAGES, FIT_POINTS, HELDOUT_IMAGES, judged_result,
                               regression_from_stats, regression_subsets)
from ..data import ImageDataset, iter_batches, len_batches, open_dataset
from ..errors import MergescopeError
from ..perm import PermSpec
from ..report.regression_pages import (
    FIGURE,
    plot_regression,
    regression_records,
    regression_section_html,
    render_regression_pages,
)

SECTION_TITLE = "Regression alignment"
CSV_NAME = "regression.csv"
VIEWS_NAME = "regression_topk.json"  # the hard channels' top-k images (A, B, regressed B): the pages' data
COLUMNS = ("layer", "channel", "m", "refit", "r2_heldout", "r2_in_sample", "recovered")


@dataclass
class RegressConfig:
    """How to regress (recorded in the run's manifest)."""

    fit_images: int = FIT_IMAGES  # fitting subset F (class-stratified, capped by the dataset)
    heldout_images: int = HELDOUT_IMAGES  # held-out subset H that R² is judged on (at most a fifth of the dataset)
    ridge: float = 0.0  # relative ridge λ
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS  # sparsity sweep (m as a fraction of B's channels)
    sparse_fraction: float = 0.05  # "needs many weights": R²(all) − R²(this, refit)
    hard_n: int = 10  # hard channels shown per layer
    k: int = 10  # top-k images per channel
    reduction: str = "max"
    batch_size: int = 256


def _nan_none(v: float):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


@dataclass
class RegressResult:
    """What :func:`run` measured (JSON-ready except nothing: it holds no models).

    Attributes:
        rows: ``regression.csv``'s rows (:data:`COLUMNS`), one per layer × channel × sparsity.
        summary: per layer and sparsity, the mean held-out R² and recovered top-k.
        hard: layer -> the channels that need many weights.
        records: the hard channels' top-k images (A, B, regressed B), the pages' data.
        info: sizes of the fitting / held-out / ranked subsets and what was ranked.
        layers: layer -> group.
    """

    rows: list[dict]
    summary: list[dict]
    hard: dict
    records: list
    info: dict
    samples: dict
    heldout_samples: dict
    layers: dict[str, str]
    timings: dict[str, float]


def run(model_a: nn.Module, model_b: nn.Module, dataset: ImageDataset, config: RegressConfig | None = None,
        spec: PermSpec | None = None, device: torch.device | str = "cpu", progress: bool = False) -> RegressResult:
    """Regress every channel of A on all channels of B's same layer (module docstring), in memory.

    Args:
        model_a, model_b: the two models (B unaligned: the map needs no permutation).
        dataset: the images (the fitting and held-out subsets are drawn from it, the rest is ranked).
        config: subset sizes, ridge, sparsity sweep, k.
    """
    from ..perm import build_spec

    cfg = config or RegressConfig()
    a, b = model_a.to(device).eval(), model_b.to(device).eval()
    spec = spec or build_spec(a, next(iter(iter_batches(dataset, 2))).x.to(device))
    timings = {}
    t0 = time.perf_counter()
    try:
        ids, held = regression_subsets(dataset, cfg.fit_images, cfg.heldout_images)
    except ValueError as e:
        raise MergescopeError(str(e)) from None
    [stats], [held_stats] = (group_covariances(a, [b], spec, iter_batches(dataset, cfg.batch_size, ids=s),
                                               device=device, progress=progress, points=FIT_POINTS)
                             for s in (ids, held))
    res = regression_from_stats(stats, cfg.ridge, cfg.fractions)
    for g in res.fits:  # m = 1 exactly (the smallest fraction may keep more weights in wide layers)
        res.sweep[g] = [*single_weight_fits(stats[g], res.fits[g]), *res.sweep.get(g, [])]
    res = judged_result(res, stats, held_stats)
    timings["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ranked = np.setdiff1d(np.arange(len(dataset)), ids)  # every image outside the fitting subset
    tops = regressed_topk(a, b, spec, res, iter_batches(dataset, cfg.batch_size, ids=ranked), k=cfg.k,
                          reduction=cfg.reduction, device=device, progress=progress,
                          total=len_batches(dataset, cfg.batch_size, ids=ranked))
    timings["top-k pass"] = time.perf_counter() - t0
    rows = [{"layer": gt.layer, "channel": c, "m": mp.m, "refit": mp.refit, "r2_heldout": _nan_none(float(mp.r2[c])),
             "r2_in_sample": _nan_none(float(mp.r2_fit[c])), "recovered": _nan_none(float(mp.recovered[c]))}
            for gt in tops.values() for mp in gt.maps.values() for c in range(len(mp.r2))]
    hard = {layer: hard_channels(gt, cfg.sparse_fraction, cfg.hard_n) for layer, gt in tops.items()}
    streams = {g: [t.name for t in spec.groups[g].observe] for g in dict.fromkeys(gt.group for gt in tops.values())
               if len(spec.groups[g].observe) > 1}
    info = {"subset": len(ids), "heldout": len(held), "ranked": len(ranked), "reduction": cfg.reduction,
            "images": len(dataset), "k": cfg.k, "streams": streams,
            "sparse_label": f"{cfg.sparse_fraction * 100:g}% refit", "hard_n": cfg.hard_n}
    return RegressResult(rows, summary_rows(tops), hard, regression_records(tops, hard, cfg.sparse_fraction), info,
                         res.samples, res.heldout_samples, {layer: gt.group for layer, gt in tops.items()}, timings)


def run_folder(run_dir: str | os.PathLike, config: RegressConfig | None = None, *,
               device: torch.device | str = "cpu", progress: bool = False, overwrite: bool = False,
               options: Mapping | None = None) -> dict:
    """The regression study of a run folder (:func:`run` on its models A and B and its probed images); returns the
    JSON recorded under ``results.json["regression"]``. The checkpoints are the ones the run's alignment names,
    checked against the sha256 it recorded."""
    from ..align.store import ALIGNMENT_FILE, load_alignments
    from ..runs import add_to_run, write_run
    from ..timing import record_since, since_here
    from .common import open_feature_run

    mark = since_here()
    cfg = config or RegressConfig()
    folder = open_feature_run(run_dir, marker=CSV_NAME, holds="a regression study", overwrite=overwrite)
    run_dir, results, manifest = folder.path, folder.results, folder.manifest
    features, dataset = folder.features, folder.dataset
    with write_run(run_dir, adds=True) as staging:
        run_dir = staging.path
        start = time.perf_counter()
        alignment = load_alignments(run_dir / ALIGNMENT_FILE) if (run_dir / ALIGNMENT_FILE).is_file() else None
        a, b = folder.models(["A", "B"], device, alignment).values()
        res = run(a, b, dataset, cfg, device=device, progress=progress)
        timings = dict(res.timings)

        t0 = time.perf_counter()
        csv_path = write_rows(run_dir / CSV_NAME, COLUMNS, res.rows)
        views_path = write_json(run_dir / VIEWS_NAME, {"views": res.records})
        info = {**res.info, "dataset": f"{features['data']} ({features['split']})"}
        out = {"summary": res.summary, "hard_channels": res.hard, "info": info, "views": VIEWS_NAME,
               "data": features["data"], "split": features["split"], "samples": res.samples,
               "heldout_samples": res.heldout_samples, "layers": res.layers, "config": dataclasses.asdict(cfg),
               "timings": timings}
        section, out["pages"], files = render_regression(run_dir, out, dataset)
        timings["report"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - start

        results["regression"] = out
        add_to_run(run_dir, results, manifest, section, [csv_path, views_path, *files], "regression",
                   {"config": dataclasses.asdict(cfg), "timings": timings, "options": dict(options or {}),
                    "time_by_stage": record_since(mark)})
    return out


def render_regression(run_dir: str | os.PathLike, study: Mapping, dataset=None) -> tuple[dict, list[dict], list[Path]]:
    """The figure, the hard channels' feature pages and the report section of a regression study, from what it
    stored (``results.json["regression"]`` and :data:`VIEWS_NAME`): no model runs.

    Args:
        study: ``results.json["regression"]``.
        dataset: the ranked images (default: opened from the study's ``data`` and ``split``).

    Returns:
        The report section ({"title", "html"}), the pages' index and the files written.
    """
    run_dir = Path(run_dir)
    if dataset is None:
        dataset = open_dataset(study["data"], split=study["split"])
    records = json.loads((run_dir / study["views"]).read_text())["views"]
    figure = plot_regression(study["summary"], run_dir / FIGURE)
    pages = render_regression_pages(run_dir, dataset, records)
    html = regression_section_html(study["summary"], study["hard_channels"], pages, FIGURE, CSV_NAME, study["info"])
    return {"title": SECTION_TITLE, "html": html}, pages, [figure, *(run_dir / p["href"] for p in pages)]


def rerender(run_dir: str | os.PathLike, results: dict) -> list[Path] | None:
    """Re-render a run's regression study (``mergescope report``): figure, pages, and its report section in
    ``results`` (``results.json`` rewritten if the section changed). None if the study stored too little to
    re-render it (made before its top-k images were stored, or :data:`VIEWS_NAME` is gone: run
    ``mergescope regress --overwrite``); [] without one.

    Returns:
        The files written.
    """
    from ..runs import RESULTS

    study = results.get("regression")
    if not study:
        return []
    run_dir = Path(run_dir)
    if not all(key in study for key in ("views", "info", "data", "split")) or not (run_dir / study["views"]).is_file():
        return None
    section, _, files = render_regression(run_dir, study)
    sections = results.setdefault("sections", [])
    old = [i for i, s in enumerate(sections) if s.get("title") == SECTION_TITLE]
    if old and sections[old[0]] == section:
        return files
    if old:
        sections[old[0]] = section  # in place: the report keeps its order
    else:
        sections.append(section)
    return [*files, write_json(run_dir / RESULTS, results)]


__all__ = ["COLUMNS", "SECTION_TITLE", "VIEWS_NAME", "RegressConfig", "RegressResult", "render_regression", "rerender",
           "run", "run_folder"]
