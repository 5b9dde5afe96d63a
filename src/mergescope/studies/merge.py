"""Merging N models at once with every method, and how much each merge keeps of the models' accuracy.

All models are put into the channel space of the first (the reference) and averaged, with equal weights unless
given: θ = Σ_k w_k·T_k(θ_k) (a merge plan with one weighting, :mod:`mergescope.studies.plan`), where T_k is the identity (``naive``), model k's permutation onto the reference
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

The registry's other methods run too (:data:`mergescope.merge.recipes.COMBINED`, compositions
``alignment>aggregation``): task vectors from ``--base``, FedAvg with ``--sample-counts`` (default: the examples
each fine-tune's sidecar records), greedy soup scored on ``--heldout-split``, Fisher / RegMean / SWA / ``ste`` on
the statistics images; the passes they make are counted as ``"method data"`` and ``"held-out"``.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..runs.csvio import write_rows
from ..runs.jsonio import write_json
from ..data import ImageDataset
from ..errors import MergescopeError
from ..perm import PermSpec
from ..report import render_report
from ..report.many_pages import many_section
from ..runs import RESULTS
from ..merge.soups import heldout_accuracy
from .common import StudyInputs, check_same_architecture, dataset_record, prepare, stats_ids
from .plan import MergePlan, execute_plan, merge_key, missing_input, plan_methods

OPTION_OF = {"base": "--base CKPT (the shared base the models were fine-tuned from)",
             "heldout": "--heldout-split SPLIT (the held-out images it is scored on)",
             "sample_counts": "--sample-counts N [N ...] (each model's number of training examples; or sidecars "
                              "that record them: mergescope train --classes/--init)"}

DEFAULT_METHODS = ("naive", "permuted", "permuted+repair", "permuted+reset", "cca+repair", "ot+repair",
                   "regression+repair")
CSV_NAME = "merges.csv"
CSV_COLUMNS = ("method", "models", "split", "loss", "accuracy")


@dataclass
class MergeConfig:
    """How ``mergescope merge`` merges N models (all into the first one's space)."""

    methods: Sequence[str] = DEFAULT_METHODS  # any method (zipit: two models; "+reset": models with BatchNorm)
    weights: Sequence[float] | None = None  # one per model, summing to 1 (None: equal weights 1/N)
    matching: str = "activation"  # how "permuted" matches: "activation" or "weight"
    batch_size: int = 500
    stats_ids: Sequence[int] | None = None  # statistics images (None: all)
    match_points: str = "stage_end"  # where a residual stream is measured: "stage_end" (the reference) or "all"
    base: str | None = None  # checkpoint of the shared base the models were fine-tuned from (task vectors)
    sample_counts: Sequence[int] | None = None  # each model's training examples (FedAvg; None: the sidecars')
    heldout_split: str | None = None  # the split a greedy soup is scored on

    def weighting(self, n: int) -> tuple[float, ...]:
        """The merge weights for ``n`` models (a one-line error unless n non-negative numbers summing to 1)."""
        if self.weights is None:
            return (1.0 / max(n, 1),) * n
        weights = tuple(float(w) for w in self.weights)
        if len(weights) != n or any(w < 0 for w in weights) or abs(sum(weights) - 1) > 1e-6:
            raise MergescopeError(f"--weights must be {n} non-negative numbers summing to 1, got {list(weights)}")
        return weights


@dataclass
class ManyResult:
    """What :func:`run` measured (JSON-ready via :meth:`to_json`, except the models).

    Attributes:
        rows: one per method and split: method, models (N), split, loss, accuracy.
        endpoints: one per input model and split: model (its index), split, loss, accuracy.
        summary: per split, the mean endpoint accuracy and, per method, its accuracy minus that mean.
        merged: method -> the merged model.
        corrections: method -> which points of the architecture its fix corrects.
        matches: models[1:] matched to the reference (when a method needed them).
    """

    rows: list[dict]
    endpoints: list[dict]
    summary: dict[str, dict]
    methods: list[str]
    passes: dict[str, int]
    timings: dict[str, float]
    merged: dict[str, nn.Module]
    corrections: dict[str, str] = field(default_factory=dict)
    matches: list | None = None
    spec: PermSpec | None = None

    def to_json(self) -> dict:
        return {"rows": self.rows, "endpoints": self.endpoints, "summary": self.summary, "methods": self.methods,
                "passes": self.passes, "timings": self.timings, "corrections": self.corrections}


def run(
    models: Sequence[nn.Module],
    train: ImageDataset,
    evals: Mapping[str, ImageDataset],
    config: MergeConfig | None = None,
    spec: PermSpec | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    base: nn.Module | None = None,
    heldout: ImageDataset | None = None,
) -> ManyResult:
    """Merge ``models`` (all into the first one's space) with every method and evaluate them.

    Args:
        models: two or more trained models of one architecture; the first is the reference.
        train: data for matching, feature statistics and REPAIR/RESET.
        evals: split name -> dataset to evaluate on.
        config: methods (``zipit`` needs exactly two models; ``+reset`` is skipped for models without
            BatchNorm), weights, statistics settings.
        base: the shared base of fine-tuned models (methods that need one: task vectors).
        heldout: the held-out images a greedy soup is scored on.

    Example:
        >>> res = run([m0, m1, m2, m3, m4], train, {"test": test}, MergeConfig(["permuted+repair", "cca+repair"]))
        >>> res.summary["test"]["gap"]["cca+repair"]       # accuracy minus the mean endpoint accuracy
    """
    cfg = config or MergeConfig()
    n = len(models)
    weights = cfg.weighting(n)
    score = None if heldout is None else heldout_accuracy(heldout, cfg.batch_size, device)
    plan = MergePlan(cfg.methods, [weights], matching=cfg.matching, batch_size=cfg.batch_size,
                     stats_ids=cfg.stats_ids, match_points=cfg.match_points, base=base, heldout=score,
                     sample_counts=cfg.sample_counts)
    res = execute_plan(plan, models, train, evals, spec=spec, device=device, progress=progress)
    rows, endpoints, summary = [], [], {}
    for split, scores in res.scores.items():
        rows += [{"method": m, "models": n, "split": split, **scores[merge_key(m, 0)]} for m in res.methods]
        ends = [{"model": k, "split": split, **scores[f"model {k}"]} for k in range(n)]
        endpoints += ends
        mean = (sum(e["accuracy"] for e in ends) / n if cfg.weights is None
                else sum(w * e["accuracy"] for w, e in zip(weights, ends)))  # the weighted mean model
        summary[split] = {"mean_endpoint_accuracy": mean,
                          "gap": {m: scores[merge_key(m, 0)]["accuracy"] - mean for m in res.methods}}
    merged = {m: res.merged[m, 0] for m in res.methods}
    return ManyResult(rows, endpoints, summary, res.methods, res.passes, res.timings, merged, res.corrections,
                      res.matches, res.spec)


def run_folder(inputs: StudyInputs, config: MergeConfig | None = None, options: Mapping | None = None) -> ManyResult:
    """N checkpoints merged with every method as a run folder: ``merges.csv``, ``results.json``, ``report.html``,
    ``alignment.safetensors`` (when the models were matched) and the manifest."""
    from ..align.store import ALIGNMENT_FILE, save_alignments
    from ..runs import write_manifest, write_run

    from ..data import open_dataset
    from ..train import load_checkpoint

    from ..timing import record_since, since_here, stage

    mark = since_here()
    cfg = config or MergeConfig()
    cfg.weighting(len(inputs.checkpoints))  # checked before anything is loaded or written
    check_inputs(cfg, len(inputs.checkpoints), counts_known=True)
    loaded, train, evals = prepare(inputs)
    if cfg.sample_counts is None and all("examples" in m for m in loaded.metas):
        cfg.sample_counts = [m["examples"] for m in loaded.metas]
    check_inputs(cfg, len(loaded.models), counts_known=False)
    base = None if cfg.base is None else load_checkpoint(cfg.base, device=inputs.device, arch=inputs.arch,
                                                         arch_kwargs=dict(inputs.arch_kwargs) or None)[0]
    if base is not None:
        check_same_architecture(loaded.models[0], base)
    heldout = None if cfg.heldout_split is None else open_dataset(inputs.data, split=cfg.heldout_split)
    with write_run(inputs.out, overwrite=inputs.overwrite) as staging:
        run_dir = staging.path
        if cfg.stats_ids is None:
            cfg.stats_ids = stats_ids(len(train), inputs.stats_images)
        start = time.perf_counter()
        result = run(loaded.models, train, evals, cfg, device=inputs.device, progress=inputs.progress, base=base,
                     heldout=heldout)
        summary = {"models": [str(c) for c in inputs.checkpoints], "dataset": inputs.data, "data passes": result.passes,
                   "runtime": f"{time.perf_counter() - start:.1f} s on {inputs.device}"}
        with stage("writing"):
            files = save(run_dir, result, f"mergescope merge: {len(loaded.models)} models", summary)
            if result.matches:
                files.append(save_alignments(run_dir / ALIGNMENT_FILE, result.spec,
                                             dict(zip(loaded.tags[1:], result.matches)), reference="A",
                                             sources=loaded.sources(), points=cfg.match_points))
        write_manifest(run_dir, {"merge": asdict(cfg), **inputs.record(), "options": dict(options or {})}, files,
                       models=loaded.record(), timings=result.timings, dataset=dataset_record(train),
                       time_by_stage=record_since(mark))
    return result


def check_inputs(cfg: MergeConfig, n: int, counts_known: bool) -> None:
    """A one-line error naming the option a selected method lacks (``counts_known``: sample counts may still come
    from the sidecars, so they are not asked for yet); ``--sample-counts`` must be n positive counts."""
    counts = cfg.sample_counts if cfg.sample_counts is not None or not counts_known else [1] * n
    missing = missing_input(plan_methods(cfg.methods), {"base": cfg.base, "heldout": cfg.heldout_split,
                                                        "sample_counts": counts})
    if missing:
        raise MergescopeError(f"--methods {missing[0]} needs {OPTION_OF[missing[1]]}")
    if cfg.sample_counts is not None and (len(cfg.sample_counts) != n or min(cfg.sample_counts) < 1):
        raise MergescopeError(f"--sample-counts must be {n} positive counts (one per checkpoint), got "
                              f"{list(cfg.sample_counts)}")


def write_section(run_dir: Path, result: ManyResult) -> tuple[dict, list[Path]]:
    """Write ``merges.csv`` and the section's figures; return the report section and the files written."""
    csv_path = write_rows(run_dir / CSV_NAME, CSV_COLUMNS, result.rows)
    section, figures = many_section(run_dir, result.to_json(), CSV_NAME)
    return section, [csv_path, *figures]


def save(run_dir: Path, result: ManyResult, title: str, summary: Mapping[str, object]) -> list[Path]:
    """Write ``merges.csv``, ``results.json`` (the result under ``"many"``) and ``report.html`` into ``run_dir``.

    Returns:
        The files written (for the manifest's hashes).
    """
    data = result.to_json()
    section, files = write_section(run_dir, result)
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
