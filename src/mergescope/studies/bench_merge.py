"""``mergescope bench-merge``: every selected merge method on every workload, one table — the survey's three
families (seed 003, Tables 1-3: ensembling, weight aggregation, neuron alignment) on the same models and data.

Per workload (:mod:`mergescope.studies.workloads`) the models are trained (or reused), merged by one merge plan
(:func:`mergescope.studies.plan.execute_plan`: matching, joint statistics, REPAIR/RESET, each passing over the data
once for every method) and then *every* model — the inputs, every merge and the ensembles — is scored in one pass
per evaluation split: per class, so that the accuracy on each half of the classes (ZipIt!'s per-task accuracy) and
the joint accuracy come from the same pass (:mod:`mergescope.evaluate.by_class`).

A row is one method on one workload and split: its joint accuracy and loss, the accuracy on each subset, the data
passes the method needs on its own (matching, statistics, its fix's, its own steps': Fisher, RegMean, SWA, ``ste``;
the held-out evaluations of a greedy soup — shared passes are made once per workload), its own seconds (its maps
and merge; the shared passes' are per workload), how it treats BatchNorm, its family and what it costs to run
(parameters, forward passes: an ensemble of N runs N models). A method a workload cannot run (task vectors without
a shared base, ZipIt! on more than two models) has a row that says why.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import ImageDataset, iter_batches, len_batches
from ..errors import MergescopeError
from ..evaluate import evaluate_models
from ..evaluate.by_class import class_sums, subset_scores
from ..merge.ensemble import inference_cost
from ..merge.recipes import batchnorm_of, has_batchnorm, resolve_method, split_method
from .plan import MergePlan, execute_plan, method_passes, plan_methods
from .workloads import BuiltWorkload, WorkloadConfig, build_workload, check_workloads

DEFAULT_WORKLOADS = ("seeds", "halves", "halves_finetune", "stratified_finetune", "hparams", "checkpoints")
DEFAULT_METHODS = ("logit_ensemble", "prob_ensemble", "naive", "fedavg", "swa", "uniform_soup", "greedy_soup",
                   "task_arithmetic", "ties", "dare", "breadcrumbs", "fisher", "regmean", "permuted", "permuted+repair",
                   "permuted+reset", "ste", "zipit+repair", "permuted>ties")
CSV_NAME = "bench.csv"
CSV_COLUMNS = ("workload", "method", "family", "split", "accuracy", "loss", "subset_a", "accuracy_a", "subset_b",
               "accuracy_b", "data_passes", "heldout_passes", "seconds", "batchnorm", "parameters", "forward_passes",
               "note")
INPUT = "input"  # the family of the rows of the workload's own models


@dataclass
class BenchConfig:
    """What ``mergescope bench-merge`` runs (recorded in the manifest)."""

    workloads: Sequence[str] = DEFAULT_WORKLOADS
    methods: Sequence[str] = DEFAULT_METHODS
    train: WorkloadConfig = field(default_factory=WorkloadConfig)
    matching: str = "activation"
    batch_size: int = 500
    stats_images: int | None = None  # images of the training split for matching, statistics, REPAIR (None: all)
    eval_splits: Sequence[str] = ("test",)
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # method (base) -> hyperparameters


@dataclass
class BenchResult:
    """The table and, per workload, what was shared (JSON-ready via :meth:`to_json`)."""

    rows: list[dict]
    workloads: dict[str, dict]
    reading: str = ""

    def to_json(self) -> dict:
        return {"rows": self.rows, "workloads": self.workloads, "reading": self.reading}


def unavailable(method: str, built: BuiltWorkload) -> str:
    """Why a workload cannot run ``method`` ("" when it can)."""
    entry, fix = resolve_method(method)
    if fix and entry.family == "ensemble":
        return "an ensemble takes no fix (it is not one set of weights)"
    if "base" in entry.needs and built.base is None:
        return f"needs a shared base: {built.workload.name}'s models are not fine-tunes of one model"
    if entry.max_models is not None and len(built.models) > entry.max_models:
        return f"merges at most {entry.max_models} models"
    if split_method(method)[1] == "reset" and not has_batchnorm(built.models[0]):
        return "+reset: the models have no BatchNorm"
    return ""


def own_passes(method: str, n: int, matching: str, params: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """(data passes, held-out passes) that ``method`` needs on its own over ``n`` models at hyperparameters
    ``params`` (module docstring)."""
    entry, fix = resolve_method(method)
    params = entry.resolve(params)
    passes = int("matches" in entry.needs and matching == "activation") + int(bool(entry.places())) + int(bool(fix))
    if not entry.plan_ready:
        passes += method_passes(entry, params, n, "align")["method data"]
        combine = method_passes(entry, params, n, "combine")
        return passes + combine["method data"], combine["held-out"]
    return passes, 0


def _heldout_score(train: ImageDataset, ids: torch.Tensor, batch_size: int, device):
    def accuracy(model: nn.Module) -> float:
        return evaluate_models({"m": model}, iter_batches(train, batch_size, ids=ids), device=device)["m"]["accuracy"]

    return accuracy


def run_workload(built: BuiltWorkload, train: ImageDataset, evals: Mapping[str, ImageDataset], cfg: BenchConfig,
                 device: torch.device | str = "cpu", progress: bool = False) -> tuple[list[dict], dict]:
    """Merge one workload's models with every method and score everything (module docstring): its rows and what
    it shared (passes, timings, members)."""
    n = len(built.models)
    name = built.workload.name
    notes = {m: unavailable(m, built) for m in plan_methods(cfg.methods)}
    runnable = [m for m, note in notes.items() if not note]
    pool = torch.ones(len(train), dtype=torch.bool)
    pool[built.heldout_ids] = False
    pool = torch.nonzero(pool).flatten()
    if cfg.stats_images and cfg.stats_images < len(pool):
        pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:cfg.stats_images]].sort()[0]
    same = all(torch.equal(ids, built.train_ids[0]) for ids in built.train_ids)
    data = built.data(train, cfg.batch_size)
    plan = MergePlan(runnable, [(1.0 / n,) * n], matching=cfg.matching, batch_size=cfg.batch_size,
                     stats_ids=pool.tolist(), base=built.base, data=data[0] if same else data,
                     heldout=_heldout_score(train, built.heldout_ids, cfg.batch_size, device),
                     sample_counts=built.sample_counts, params=cfg.params)
    res = execute_plan(plan, built.models, train, {}, device=device, progress=progress)
    everything = {f"model {k}": m for k, m in enumerate(built.models)}
    everything.update({m: res.merged[m, 0] for m in res.methods})
    passes, t0 = dict(res.passes), time.perf_counter()
    groups = [everything]  # every model in one pass per split
    sums = {}
    for split, ds in evals.items():
        sums[split] = {k: v for g in groups for k, v in class_sums(
            g, iter_batches(ds, cfg.batch_size), len(ds.classes), device=device, progress=progress,
            total=len_batches(ds, cfg.batch_size), desc=f"{name}: evaluating on {split}").items()}
    passes["evaluation"] = len(groups) * len(evals)
    timings = {**res.timings, "evaluation": time.perf_counter() - t0}
    rows = []
    for split in evals:
        def scored(key: str) -> dict:
            return scores(sums[split][key], built.subsets)

        for k, (member, model) in enumerate(zip(built.names, built.models)):
            rows.append({"workload": name, "method": f"model {k} ({member})", "family": INPUT, "split": split,
                         **scored(f"model {k}"), "data_passes": 0, "heldout_passes": 0, "seconds": 0.0,
                         "batchnorm": "", **inference_cost(model), "note": ""})
        for method, note in notes.items():
            entry = resolve_method(method)[0]
            row = {"workload": name, "method": method, "family": entry.family, "split": split,
                   "batchnorm": batchnorm_of(method), "note": note}
            if method in res.methods:
                data_passes, heldout = own_passes(method, n, cfg.matching,
                                                  cfg.params.get(split_method(method)[0]))
                row.update(scored(method), data_passes=data_passes, heldout_passes=heldout,
                           seconds=res.method_seconds.get(split_method(method)[0], 0.0),
                           **inference_cost(res.merged[method, 0]))
            elif not note:
                row["note"] = "not run for these models"
            rows.append({c: row.get(c) for c in CSV_COLUMNS})
    shared = {"members": built.names, "sample_counts": built.sample_counts, "passes": passes,
              "timings": timings, "checkpoints": {k: str(v) for k, v in built.checkpoints.items()},
              "subsets": built.subsets}
    return rows, shared


def scores(sums: torch.Tensor, subsets: Mapping[str, Sequence[int]]) -> dict:
    """A row's accuracy and loss on every image and its accuracy on the images of each of the two subsets'
    classes, from :func:`~mergescope.evaluate.by_class.class_sums`' [3, K]."""
    joint = subset_scores(sums)
    (sub_a, classes_a), (sub_b, classes_b) = subsets.items()
    return {"accuracy": joint["accuracy"], "loss": joint["loss"], "subset_a": sub_a, "subset_b": sub_b,
            "accuracy_a": subset_scores(sums, classes_a)["accuracy"],
            "accuracy_b": subset_scores(sums, classes_b)["accuracy"]}


def run(cfg: BenchConfig, train: ImageDataset, evals: Mapping[str, ImageDataset], folder: str | Path,
        device: torch.device | str = "cpu", progress: bool = False) -> BenchResult:
    """Every workload of ``cfg`` trained (or reused) under ``folder`` and benchmarked (module docstring)."""
    from ..report.bench_pages import read_table

    rows, shared = [], {}
    for name in check_workloads(cfg.workloads):
        built = build_workload(name, cfg.train, train, folder, device=device, progress=progress)
        got, shared[name] = run_workload(built, train, evals, cfg, device=device, progress=progress)
        rows += got
    return BenchResult(rows, shared, read_table(rows))


def check_config(cfg: BenchConfig) -> None:
    """One-line errors for what no workload could run, before anything is trained."""
    check_workloads(cfg.workloads)
    plan_methods(cfg.methods)
    if cfg.train.models < 2:
        raise MergescopeError(f"--models must be at least 2, got {cfg.train.models}")


def run_folder(cfg: BenchConfig, data: str, out: str, *, split: str = "train", checkpoints: str | None = None,
               device: str = "cpu", progress: bool = False, overwrite: bool = False,
               options: Mapping | None = None) -> BenchResult:
    """The benchmark as a run folder: ``bench.csv``, ``results.json``, ``report.html`` (one bar chart per
    workload), the trained models under ``checkpoints/`` (or ``checkpoints``, where they are reused) and the
    manifest with every file's sha256."""
    from ..models import check_input_fits, create_model
    from ..report import render_report
    from ..report.bench_pages import bench_section
    from ..runs import RESULTS, write_manifest, write_run
    from ..runs.csvio import write_rows
    from ..runs.jsonio import write_json
    from ..timing import record_since, since_here
    from .common import dataset_record, open_data

    check_config(cfg)
    mark = since_here()
    train, evals = open_data(data, split, eval_splits=cfg.eval_splits)  # opened once, then checked to fit
    probe = create_model(cfg.train.arch, **{"in_channels": train.num_channels, "num_classes": len(train.classes),
                                            **dict(cfg.train.arch_kwargs)})
    check_input_fits(probe, train, f"--arch {cfg.train.arch}")
    with write_run(out, overwrite=overwrite) as staging:
        run_dir = staging.path
        folder = Path(checkpoints) if checkpoints else run_dir / "checkpoints"
        start = time.perf_counter()
        result = run(cfg, train, evals, folder, device=device, progress=progress)
        csv_path = write_rows(run_dir / CSV_NAME, CSV_COLUMNS, result.rows)
        section, figures = bench_section(run_dir, result.to_json(), CSV_NAME)
        summary = {"dataset": data, "workloads": ", ".join(cfg.workloads), "architecture": cfg.train.arch,
                   "runtime": f"{time.perf_counter() - start:.1f} s on {device}"}
        results = {"title": "mergescope bench-merge", "summary": summary, "bench": result.to_json(),
                   "sections": [section], "headline": result.reading}
        json_path = write_json(run_dir / RESULTS, results)
        files = [csv_path, *figures, json_path, render_report(run_dir, results)]
        if not checkpoints:
            files += sorted(folder.rglob("*.safetensors")) + sorted(folder.rglob("*.json"))
        write_manifest(run_dir, {"bench": asdict(cfg), "data": data, "split": split,
                                 "checkpoints": str(folder) if checkpoints else "checkpoints",
                                 "options": dict(options or {})}, files, dataset=dataset_record(train),
                       time_by_stage=record_since(mark))
    return result


def format_table(rows: Sequence[Mapping], anchors: Mapping[str, str] | None = None) -> str:
    """The table as plain text, one line per row (``anchors``: method -> a published number shown beside it)."""
    def pct(v) -> str:
        return f"{100 * v:5.1f}" if isinstance(v, float) and v == v else "    —"

    head = (f"{'workload':<20} {'method':<28} {'family':<11} {'acc':>5} {'sub a':>5} {'sub b':>5} {'loss':>7} "
            f"{'passes':>6} {'held':>4} {'sec':>6} {'bn':<6} {'fwd':>3}")
    lines = [head]
    for r in rows:
        loss = f"{r['loss']:7.3f}" if isinstance(r.get("loss"), float) and r["loss"] == r["loss"] else "      —"
        tail = f"  {r['note']}" if r.get("note") else ""
        if anchors and r["method"] in anchors:
            tail += f"  [anchor: {anchors[r['method']]}]"
        lines.append(f"{r['workload']:<20} {r['method']:<28} {r['family']:<11} {pct(r.get('accuracy'))} "
                     f"{pct(r.get('accuracy_a'))} {pct(r.get('accuracy_b'))} {loss} "
                     f"{r.get('data_passes') if r.get('data_passes') is not None else '—':>6} "
                     f"{r.get('heldout_passes') if r.get('heldout_passes') is not None else '—':>4} "
                     f"{r['seconds'] if r.get('seconds') is not None else float('nan'):6.2f} "
                     f"{r.get('batchnorm') or '':<6} {r.get('forward_passes') or '—':>3}{tail}")
    return "\n".join(lines)
