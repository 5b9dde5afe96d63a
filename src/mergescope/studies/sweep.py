"""The interpolation study of two models (``mergescope sweep``, thesis 000 Fig. 3.1): align, merge along α with
every method, repair, evaluate — a merge plan over α (:mod:`mergescope.studies.plan`).

Data passes: one over the statistics set for matching (activation matching), one for the joint feature
statistics of the map-based methods (CCA, OT fusion, regression; at the observation points and, for OT fusion,
also at the pre-activations) if any is asked for, one for REPAIR and RESET of every merged model at once, and one
per evaluation split for every model at once.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..runs.jsonio import write_json
from ..align import MatchResult
from ..data import ImageDataset
from ..errors import MergescopeError
from ..merge import alpha_grid
from ..merge.methods import get_merge_method
from ..merge.recipes import check_methods, split_method
from ..perm import PermSpec
from ..report import render_report, write_csv
from .common import StudyInputs, dataset_record, prepare, stats_ids
from .plan import MergePlan, execute_plan, merge_key

METHODS = ("naive", "permuted", "permuted+repair", "permuted+reset")  # the default sweep


@dataclass
class SweepConfig:
    """What to sweep and how."""

    alphas: list[float] = field(default_factory=alpha_grid)  # θ(α) = α·θ_A + (1−α)·P(θ_B)
    methods: Sequence[str] = METHODS  # sweepable methods; "…+reset" is skipped for nets without BatchNorm
    matching: str = "activation"  # "activation" (correlation) or "weight" (Git Re-Basin weight matching)
    batch_size: int = 500  # images per batch in every pass
    stats_ids: Sequence[int] | None = None  # training images for matching and REPAIR statistics (None: all)
    match_points: str = "stage_end"  # where a residual stream is measured: "stage_end" (the reference) or "all"


def sweep_methods() -> tuple[str, ...]:
    """The methods a sweep can run: every base that keeps the reference fixed along α. Map-based bases rewrite B in
    A's channel space by a per-group linear map fitted on the statistics set, then interpolate —
    α·θ_A + (1−α)·T(θ_B); at α = 0 this is T(B), not B (T is exact only for permutations). ZipIt! is not swept:
    its matching itself depends on α and is undefined at α = 0 and 1; MergeMany moves A too."""
    from ..merge.recipes import ALL_METHODS

    return tuple(m for m in ALL_METHODS if get_merge_method(split_method(m)[0]).sweepable)


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


def run(
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
        >>> result = run(model_a, model_b, load_digits("train"), {"test": load_digits("test")})
        >>> barriers(result.rows)
    """
    cfg = config or SweepConfig()
    methods = check_methods(cfg.methods, sweep_methods())
    plan = MergePlan(methods, [(a, 1.0 - a) for a in cfg.alphas], matching=cfg.matching, batch_size=cfg.batch_size,
                     stats_ids=cfg.stats_ids, match_points=cfg.match_points, match_always=True)
    res = execute_plan(plan, [model_a, model_b], train, evals, spec=spec, device=device, progress=progress)
    rows, endpoints = [], []
    names = {"model 0": "A", "model 1": "B", "model 1 aligned": "B aligned"}
    for split, scores in res.scores.items():
        rows += [{"method": m, "alpha": cfg.alphas[i], "split": split, **scores[merge_key(m, i)]}
                 for (m, i) in res.merged]
        endpoints += [{"model": name, "split": split, **scores[key]} for key, name in names.items()]
    rows.sort(key=lambda r: (r["split"], res.methods.index(r["method"]), r["alpha"]))
    mid = min(range(len(cfg.alphas)), key=lambda i: abs(cfg.alphas[i] - 0.5))
    midpoint = {m: res.merged[m, mid] for m in res.methods}
    return SweepResult(rows, endpoints, res.matches[0], res.methods, res.passes, res.timings, res.aligned[0],
                       midpoint, res.spec, res.corrections)


def run_folder(inputs: StudyInputs, config: SweepConfig | None = None, options: Mapping | None = None) -> SweepResult:
    """The sweep of two checkpoints as a run folder: ``interpolation.csv``, ``results.json``, ``report.html``,
    ``alignment.safetensors`` (B's permutation onto A) and the manifest.

    Args:
        inputs: checkpoints (A, B), data, run folder and the shared options.
        config: the sweep's settings; ``stats_ids`` are drawn from ``inputs.stats_images`` when not given.
        options: the resolved command-line options, recorded in the manifest.
    """
    from ..align.store import ALIGNMENT_FILE, save_alignments
    from ..runs import write_manifest, write_run
    from ..timing import record_since, since_here, stage

    mark = since_here()
    cfg = config or SweepConfig()
    if len(inputs.checkpoints) != 2:
        raise MergescopeError(f"a sweep takes two checkpoints (A and B), got {len(inputs.checkpoints)}")
    loaded, train, evals = prepare(inputs)
    with write_run(inputs.out, overwrite=inputs.overwrite) as staging:  # only once every input is known to be good
        run_dir = staging.path
        if cfg.stats_ids is None:
            cfg.stats_ids = stats_ids(len(train), inputs.stats_images)
        start = time.perf_counter()
        result = run(*loaded.models, train, evals, cfg, device=inputs.device, progress=inputs.progress)
        a, b = inputs.checkpoints
        summary = {"model A": str(a), "model B": str(b), "dataset": inputs.data, "matching": cfg.matching,
                   "data passes": result.passes, "runtime": f"{time.perf_counter() - start:.1f} s on {inputs.device}"}
        sources = loaded.sources()
        with stage("writing"):
            alignment = save_alignments(run_dir / ALIGNMENT_FILE, result.spec, {"B": result.match}, reference="A",
                                        sources=sources, points=cfg.match_points)
            files = save(run_dir, result, f"mergescope sweep: {Path(a).name} × {Path(b).name}", summary)
        write_manifest(run_dir, {"sweep": asdict(cfg), **inputs.record(), "options": dict(options or {})},
                       [*files, alignment], models=loaded.record(), timings=result.timings,
                       dataset=dataset_record(train), time_by_stage=record_since(mark))
    return result


def save(run_dir: Path, result: SweepResult, title: str, summary: Mapping[str, object],
         sections: Sequence[dict] = (), features: Mapping | None = None, extra: Mapping | None = None) -> list[Path]:
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
