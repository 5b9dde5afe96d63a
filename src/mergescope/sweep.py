"""The interpolation study of two models: align, merge along α with every method, repair, evaluate.

Data passes: one over the statistics set for matching (activation matching), one for the joint feature
statistics of the map-based methods (CCA, OT fusion, regression; at the observation points and, for OT fusion,
also at the pre-activations) if any is asked for, one for REPAIR and RESET of
every merged model at once, and one per evaluation split for every model at once.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._jsonio import write_json
from .align import MatchResult, match_many, weight_matching
from .align.covariance import group_covariances_at
from .data import ImageDataset, iter_batches, len_batches
from .errors import ArchitectureError, MergescopeError
from .evaluate import evaluate_models
from .merge import (RepairTarget, alpha_grid, interpolate_model, map_layout, merge_with_maps, permutation_maps,
                    repair_many)
from .merge.recipes import (ALL_METHODS, MAP_METHODS, REPAIR_FIXES, check_methods, corrections, has_batchnorm,
                             map_places, split_method)
from .perm import PermSpec, build_spec, permute_model
from .report import render_report, write_csv

METHODS = ("naive", "permuted", "permuted+repair", "permuted+reset")  # the default sweep
# Map-based bases rewrite B in A's channel space by a per-group linear map fitted on the statistics set, then
# interpolate — α·θ_A + (1−α)·T(θ_B). At α = 0 this is T(B), not B (T is exact only for permutations). ZipIt! is
# not swept: its matching itself depends on α and is undefined at α = 0 and 1; MergeMany moves A too (both merge
# at one α in mergescope.many).
SWEEP_METHODS = tuple(m for m in ALL_METHODS if split_method(m)[0] not in ("zipit", "mergemany"))


@dataclass
class SweepConfig:
    """What to sweep and how."""

    alphas: list[float] = field(default_factory=alpha_grid)  # θ(α) = α·θ_A + (1−α)·P(θ_B)
    methods: Sequence[str] = METHODS  # any of SWEEP_METHODS; "…+reset" is skipped for nets without BatchNorm
    matching: str = "activation"  # "activation" (correlation) or "weight" (Git Re-Basin weight matching)
    batch_size: int = 500  # images per batch in every pass
    stats_ids: Sequence[int] | None = None  # training images for matching and REPAIR statistics (None: all)
    match_points: str = "stage_end"  # where a residual stream is measured: "stage_end" (the reference) or "all"


@dataclass
class SweepResult:
    """Everything the interpolation study measured (JSON-ready via :meth:`to_json`, except the models)."""

    rows: list[dict]  # method, alpha, split, loss, accuracy
    endpoints: list[dict]  # model (A, B, B aligned), split, loss, accuracy
    match: MatchResult
    methods: list[str]
    passes: dict[str, int]  # data passes by purpose
    timings: dict[str, float]  # seconds by stage
    aligned_b: nn.Module
    midpoint: dict[str, nn.Module]  # method -> its merged model at the α closest to 0.5 (for feature views)
    spec: PermSpec  # the permutation spec used
    corrections: dict[str, str] = field(default_factory=dict)  # method -> which points its fix corrects

    def to_json(self) -> dict:
        return {"rows": self.rows, "endpoints": self.endpoints, "matching": self.match.summary(),
                "matching_method": self.match.method, "passes": self.passes, "timings": self.timings,
                "methods": self.methods, "corrections": self.corrections}


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    """Raise a one-line ArchitectureError unless both models have the same class and tensors."""
    if type(model_a) is not type(model_b):
        raise ArchitectureError(f"cannot align a {type(model_a).__name__} with a {type(model_b).__name__}")
    sa, sb = model_a.state_dict(), model_b.state_dict()
    for k in sa.keys() | sb.keys():
        if k not in sa or k not in sb:
            raise ArchitectureError(f"models differ: tensor '{k}' exists in only one of them")
        if sa[k].shape != sb[k].shape:
            raise ArchitectureError(f"models differ: '{k}' is {tuple(sa[k].shape)} vs {tuple(sb[k].shape)}")


def _check_function_preserved(model: nn.Module, permuted: nn.Module, x: torch.Tensor) -> None:
    """Permuting must not change what a model computes; a failure here is a spec bug, said plainly."""
    with torch.inference_mode():
        ya, yb = model.eval()(x), permuted.eval()(x)
    err = (ya - yb).abs().max().item() / max(ya.abs().max().item(), 1e-12)
    if err > 1e-4:
        raise ArchitectureError(f"the permuted model's outputs differ by {err:.2e} (relative): "
                                "the derived permutation spec is wrong for this architecture")


def run_sweep(
    model_a: nn.Module,
    model_b: nn.Module,
    train: ImageDataset,
    evals: Mapping[str, ImageDataset],
    config: SweepConfig | None = None,
    spec: PermSpec | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> SweepResult:
    """Align B to A, merge along α with every method, REPAIR/RESET, and evaluate on each split.

    Args:
        model_a, model_b: two trained models of one architecture.
        train: the data for matching and REPAIR/RESET statistics.
        evals: split name -> dataset to evaluate on (e.g. {"test": test_ds}).
        config: alphas, methods, matching method, batch size.

    Returns:
        A :class:`SweepResult`; rows hold every method × α × split.

    Example:
        >>> result = run_sweep(model_a, model_b, load_digits("train"), {"test": load_digits("test")})
        >>> barriers(result.rows)
    """
    cfg = config or SweepConfig()
    methods = check_methods(cfg.methods, SWEEP_METHODS)
    check_same_architecture(model_a, model_b)
    model_a, model_b = model_a.to(device).eval(), model_b.to(device).eval()
    ids = None if cfg.stats_ids is None else torch.as_tensor(list(cfg.stats_ids))

    def stats_batches():
        return iter_batches(train, cfg.batch_size, ids=ids)

    n_stats = len_batches(train, cfg.batch_size, ids=ids)
    probe_x = next(iter(stats_batches())).x[:8].to(device)
    spec = spec or build_spec(model_a, probe_x)
    timings, passes = {}, {"matching": 0, "repair/reset": 0, "evaluation": 0}
    map_bases = list(dict.fromkeys(b for b, _ in map(split_method, methods) if b in MAP_METHODS))
    if map_bases:
        passes["map statistics"] = 0

    t0 = time.perf_counter()
    if cfg.matching == "activation":
        [match] = match_many(model_a, [model_b], spec, stats_batches(), device=device, progress=progress,
                             total=n_stats, points=cfg.match_points)
        passes["matching"] += 1
    elif cfg.matching == "weight":
        match = weight_matching(model_a.state_dict(), model_b.state_dict(), spec, device=device)
    else:
        raise MergescopeError(f"unknown matching method '{cfg.matching}' (use 'activation' or 'weight')")
    timings["matching"] = time.perf_counter() - t0
    aligned_b = permute_model(model_b, spec, match.perms)
    _check_function_preserved(model_b, aligned_b, probe_x)

    methods = [m for m in methods if split_method(m)[1] != "reset" or has_batchnorm(model_a)]
    maps_b = {"naive": {}, "permuted": permutation_maps(match.perms)}  # base -> B's maps into A's space
    if map_bases:
        t0 = time.perf_counter()
        places = map_places(map_bases)  # one pass, every place a method needs
        stats = group_covariances_at(model_a, [model_b], spec, stats_batches(), places, device=device,
                                     progress=progress, total=n_stats, points=cfg.match_points)
        passes["map statistics"] += 1
        maps_b.update({m: MAP_METHODS[m]({p: stats[p][0] for p in places}) for m in map_bases})
        layout = map_layout(model_a, spec)
        timings["map statistics"] = time.perf_counter() - t0
    merged: dict[tuple[str, float], nn.Module] = {}
    repair, reset = [], []
    for alpha in cfg.alphas:
        for method in methods:
            base, fix = split_method(method)
            if base in MAP_METHODS:
                net = merge_with_maps(model_a, model_b, maps_b[base], alpha, layout)
            else:
                net = interpolate_model(model_a, model_b if base == "naive" else aligned_b, alpha)
            merged[method, alpha] = net
            if fix in REPAIR_FIXES:
                repair.append(RepairTarget(net, (alpha, 1.0 - alpha), ({}, maps_b[base]), REPAIR_FIXES[fix]))
            elif fix == "reset":
                reset.append(net)

    t0 = time.perf_counter()
    if repair or reset:  # every REPAIR targets A and the original B, seen through each method's maps
        repair_many([model_a, model_b], spec, stats_batches(), repair=repair, reset=reset, device=device,
                    progress=progress, total=n_stats)
        passes["repair/reset"] += 1
    timings["repair/reset"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows, endpoints = [], []
    models = {f"{m}@{a}": net for (m, a), net in merged.items()}
    models.update({"A": model_a, "B": model_b, "B aligned": aligned_b})
    for split, ds in evals.items():
        scores = evaluate_models(models, iter_batches(ds, cfg.batch_size), device=device, progress=progress,
                                 total=len_batches(ds, cfg.batch_size), desc=f"evaluating on {split}")
        passes["evaluation"] += 1
        for (method, alpha) in merged:
            rows.append({"method": method, "alpha": alpha, "split": split, **scores[f"{method}@{alpha}"]})
        endpoints += [{"model": k, "split": split, **scores[k]} for k in ("A", "B", "B aligned")]
    timings["evaluation"] = time.perf_counter() - t0
    rows.sort(key=lambda r: (r["split"], methods.index(r["method"]), r["alpha"]))
    mid = min(cfg.alphas, key=lambda a: abs(a - 0.5))
    midpoint = {m: merged[m, mid] for m in methods}
    return SweepResult(rows, endpoints, match, methods, passes, timings, aligned_b, midpoint, spec,
                       corrections(spec, methods))


def save_sweep(run_dir: Path, result: SweepResult, title: str, summary: Mapping[str, object],
               sections: Sequence[dict] = (), features: Mapping | None = None,
               extra: Mapping | None = None) -> list[Path]:
    """Write the sweep's ``interpolation.csv``, ``results.json`` and ``report.html`` into ``run_dir``.

    ``sections`` ({"title", "html"}) are extra report sections, e.g. the index of feature pages; ``features``
    ({"data", "split", "views"}) records how to re-render the feature pages from the stored probe; ``extra``
    holds further JSON-able results (e.g. the channel comparison's summaries under "compare").

    Returns:
        The files written (for the manifest's hashes).
    """
    csv_path = write_csv(run_dir / "interpolation.csv", result.rows)
    results = {"title": title, "summary": dict(summary), **result.to_json(), "sections": list(sections),
               **({"features": dict(features)} if features else {}), **dict(extra or {})}
    json_path = write_json(run_dir / "results.json", results)
    report = render_report(run_dir, results)
    return [csv_path, json_path, report]
