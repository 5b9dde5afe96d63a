"""Merging N models at once with every method, and how much each merge keeps of the models' accuracy.

All models are put into the channel space of the first (the reference) and averaged with equal weights:
θ = (1/N)·Σ_k T_k(θ_k), where T_k is the identity (``naive``), model k's permutation onto the reference
(``permuted``: activation matching of every model to the reference), its permutation into the models' common
space (``mergemany``: Git Re-Basin's MergeMany, weight matching, no data), or its CCA / OT / regression map
(:mod:`mergescope.merge.recipes`); ``zipit`` zips two models. ``+repair`` sets each merged channel's mean and
std to the average of what the mapped models compute there (on a residual net at every block output, through an
added layer, with every BatchNorm reset, as REPAIR's reference; ``+repair_preact``: at the pre-activations,
fused); ``+reset`` recomputes BatchNorm statistics.

Data passes, whatever the number of models and methods: one for matching (if ``permuted`` is asked for), one for
the joint feature statistics (if a map-based method is; at the observation points and, for OT fusion, also at the
pre-activations), one for REPAIR and RESET of every merged model at once,
and one per evaluation split for every model at once.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._csvio import write_rows
from ._jsonio import write_json
from .align import match_many, merge_many_matching
from .align.covariance import group_covariances_at
from .data import ImageDataset, iter_batches, len_batches
from .errors import MergescopeError
from .evaluate import evaluate_models
from .merge import RepairTarget, map_layout, merge_models_with_maps, permutation_maps, repair_many, zipit_maps
from .merge.recipes import (ALL_METHODS, MAP_METHODS, REPAIR_FIXES, check_methods, corrections, has_batchnorm,
                             map_places, split_method)
from .perm import PermSpec, build_spec
from .report import render_report
from .report.many_pages import many_section
from .runs import RESULTS
from .sweep import check_same_architecture

DEFAULT_METHODS = ("naive", "permuted", "permuted+repair", "permuted+reset", "cca+repair", "ot+repair",
                   "regression+repair")
CSV_NAME = "merges.csv"
CSV_COLUMNS = ("method", "models", "split", "loss", "accuracy")


@dataclass
class ManyResult:
    """What :func:`merge_many` measured (JSON-ready via :meth:`to_json`, except the models).

    Attributes:
        rows: one per method and split: method, models (N), split, loss, accuracy.
        endpoints: one per input model and split: model (its index), split, loss, accuracy.
        summary: per split, the mean endpoint accuracy and, per method, its accuracy minus that mean.
        merged: method -> the merged model.
        corrections: method -> which points of the architecture its fix corrects.
    """

    rows: list[dict]
    endpoints: list[dict]
    summary: dict[str, dict]
    methods: list[str]
    passes: dict[str, int]
    timings: dict[str, float]
    merged: dict[str, nn.Module]
    corrections: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"rows": self.rows, "endpoints": self.endpoints, "summary": self.summary, "methods": self.methods,
                "passes": self.passes, "timings": self.timings, "corrections": self.corrections}


def merge_many(
    models: Sequence[nn.Module],
    train: ImageDataset,
    evals: Mapping[str, ImageDataset],
    methods: Sequence[str] = DEFAULT_METHODS,
    batch_size: int = 500,
    stats_ids: Sequence[int] | None = None,
    spec: PermSpec | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    match_points: str = "stage_end",
) -> ManyResult:
    """Merge ``models`` (all into the first one's space, equal weights) with every method and evaluate them.

    Args:
        models: two or more trained models of one architecture; the first is the reference.
        train: data for matching, feature statistics and REPAIR/RESET.
        evals: split name -> dataset to evaluate on.
        methods: names from :data:`mergescope.merge.recipes.ALL_METHODS` (``zipit`` needs exactly two models;
            ``+reset`` is skipped for models without BatchNorm).
        stats_ids: training images for the statistics (None: all).
        match_points: where a residual stream is measured for matching and joint statistics: ``"stage_end"``
            (REPAIR's reference) or ``"all"`` (:func:`mergescope.perm.observation_points`).

    Example:
        >>> res = merge_many([m0, m1, m2, m3, m4], train, {"test": test}, ["permuted+repair", "cca+repair"])
        >>> res.summary["test"]["gap"]["cca+repair"]       # accuracy minus the mean endpoint accuracy
    """
    if len(models) < 2:
        raise MergescopeError(f"merging needs at least two models, got {len(models)}")
    methods = check_methods(methods, ALL_METHODS)
    if len(models) != 2 and any(split_method(m)[0] == "zipit" for m in methods):
        raise MergescopeError(f"zipit merges two models, not {len(models)}")
    for m in models[1:]:
        check_same_architecture(models[0], m)
    models = [m.to(device).eval() for m in models]
    ref, others = models[0], models[1:]
    methods = [m for m in methods if split_method(m)[1] != "reset" or has_batchnorm(ref)]
    bases = list(dict.fromkeys(split_method(m)[0] for m in methods))
    ids = None if stats_ids is None else torch.as_tensor(list(stats_ids))

    def stats_batches():
        return iter_batches(train, batch_size, ids=ids)

    n_stats = len_batches(train, batch_size, ids=ids)
    spec = spec or build_spec(ref, next(iter(stats_batches())).x[:8].to(device))
    layout = map_layout(ref, spec)
    passes, timings = {"repair/reset": 0, "evaluation": 0}, {}
    n = len(models)
    weights = [1.0 / n] * n
    maps: dict[str, list[dict]] = {"naive": [{}] * n}  # base -> per model, its maps into the merged space

    t0 = time.perf_counter()
    if "permuted" in bases:
        matches = match_many(ref, others, spec, stats_batches(), device=device, progress=progress, total=n_stats,
                             points=match_points)
        maps["permuted"] = [{}] + [permutation_maps(r.perms) for r in matches]
        passes["matching"] = 1
    if set(bases) & (set(MAP_METHODS) | {"zipit"}):
        places = map_places(bases)
        stats = group_covariances_at(ref, others, spec, stats_batches(), places, device=device, progress=progress,
                                     total=n_stats, points=match_points)  # one pass, every place a method needs
        passes["map statistics"] = 1
        for base in bases:
            if base in MAP_METHODS:
                maps[base] = [{}] + [MAP_METHODS[base]({p: stats[p][k] for p in places}) for k in range(len(others))]
            elif base == "zipit":
                maps_a, maps_b, _ = zipit_maps(stats["observe"][0])
                maps[base] = [maps_a, maps_b]
    if "mergemany" in bases:
        results = merge_many_matching([m.state_dict() for m in models], spec, device=device)
        maps["mergemany"] = [permutation_maps(r.perms) for r in results]
    timings["alignment"] = time.perf_counter() - t0

    merged, repair, reset = {}, [], []
    built: dict[str, nn.Module] = {}
    for method in methods:
        base, fix = split_method(method)
        if base not in built:
            built[base] = merge_models_with_maps(models, weights, maps[base], layout)
        net = merged[method] = built[base] if not fix else copy.deepcopy(built[base])
        if fix in REPAIR_FIXES:
            repair.append(RepairTarget(net, weights, maps[base], REPAIR_FIXES[fix]))
        elif fix == "reset":
            reset.append(net)

    t0 = time.perf_counter()
    if repair or reset:
        repair_many(models, spec, stats_batches(), repair, reset, device=device, progress=progress, total=n_stats)
        passes["repair/reset"] = 1
    timings["repair/reset"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows, endpoints, summary = [], [], {}
    everything = {**{f"model {k}": m for k, m in enumerate(models)}, **merged}
    for split, ds in evals.items():
        scores = evaluate_models(everything, iter_batches(ds, batch_size), device=device, progress=progress,
                                 total=len_batches(ds, batch_size), desc=f"evaluating on {split}")
        passes["evaluation"] += 1
        rows += [{"method": m, "models": n, "split": split, **scores[m]} for m in methods]
        ends = [{"model": k, "split": split, **scores[f"model {k}"]} for k in range(n)]
        endpoints += ends
        mean = sum(e["accuracy"] for e in ends) / n
        summary[split] = {"mean_endpoint_accuracy": mean,
                          "gap": {m: scores[m]["accuracy"] - mean for m in methods}}
    timings["evaluation"] = time.perf_counter() - t0
    return ManyResult(rows, endpoints, summary, methods, passes, timings, merged, corrections(spec, methods))


def write_many(run_dir: Path, result: ManyResult) -> tuple[dict, list[Path]]:
    """Write ``merges.csv`` and the section's figures; return the report section and the files written."""
    csv_path = write_rows(run_dir / CSV_NAME, CSV_COLUMNS, result.rows)
    section, figures = many_section(run_dir, result.to_json(), CSV_NAME)
    return section, [csv_path, *figures]


def save_many(run_dir: Path, result: ManyResult, title: str, summary: Mapping[str, object]) -> list[Path]:
    """Write ``merges.csv``, ``results.json`` (the result under ``"many"``) and ``report.html`` into ``run_dir``.

    Returns:
        The files written (for the manifest's hashes).
    """
    data = result.to_json()
    section, files = write_many(run_dir, result)
    results = {"title": title, "summary": dict(summary), "many": data, "sections": [section],
               "headline": many_headline(data)}
    json_path = write_json(run_dir / RESULTS, results)
    return [*files, json_path, render_report(run_dir, results)]


def many_headline(data: Mapping) -> str:
    """One sentence: the best merge on the test split (else the first), against the mean input model."""
    split = "test" if "test" in data["summary"] else next(iter(data["summary"]), None)
    if split is None:
        return ""
    s = data["summary"][split]
    best = max(s["gap"], key=s["gap"].get)
    n = len({e["model"] for e in data["endpoints"]})
    gap = s["gap"][best]
    return (f"Merging {n} models: {best} keeps {100 * (s['mean_endpoint_accuracy'] + gap):.1f}% {split} accuracy, "
            f"{abs(100 * gap):.1f} points {'below' if gap < 0 else 'above'} the mean model "
            f"({100 * s['mean_endpoint_accuracy']:.1f}%).")
