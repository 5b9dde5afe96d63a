"""``mergescope study``: the thesis's whole experiment (000 §3.2, Appendices A–C) on a set of models, as stages
that are stored with the hash of their inputs and config, so a rerun does only what is no longer valid.

Stages, each a study of its own written into the study folder (``OUT``):

* ``train`` — every model trained from the zoo (``checkpoints/model_<tag>.safetensors``), unless checkpoints are
  given (any form the front door accepts);
* ``sweep`` — A and B merged along α with every method (``sweep/``, Fig. 3.1);
* ``features`` — every model aligned to the reference and probed, with A and B merged at α (``features/``: the
  pair's feature pages, Fig. 3.3, and n models aligned to one, Fig. 3.4);
* ``compare`` — τ, δ, overlap, correlation per channel pair, Observations 1–3 and partial merging by metric
  (Fig. 3.2), added to ``features/``;
* ``regress`` — channels as sparse linear maps of the other model's (Fig. 3.5), added to ``features/``;
* ``merge`` — all models merged into one with every method (``merge/``);

then the overview page ``report.html``, rendered from what the stages stored.

A stage's key is the sha256 of its config, its inputs (checkpoint hashes, the dataset's fingerprint, the device)
and the keys of the stages it reads; ``stages.json`` records the key of every finished stage. A stage whose key is
recorded and whose folder is there is skipped; any other is run by its command, which writes the stage's folder as
a whole (:mod:`mergescope.runs.transaction`: a staging folder put in place by one rename). A kill at any moment
leaves the study as it was before that stage, and a rerun gives the same results as an uninterrupted run. A lock
(``.OUT.lock`` beside the study folder) keeps a second writer out.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MergescopeError
from ..runs.jsonio import dumps, package_version, write_json
from ..runs.transaction import RunLock, sibling
from ..timing import record_since, since_here
from .common import StudyInputs, model_tags

STAGES = ("train", "sweep", "features", "compare", "regress", "merge")
NEEDS = {"train": (), "sweep": ("train",), "features": ("train",), "compare": ("features",),
         "regress": ("features",), "merge": ("train",)}
FOLDERS = {"sweep": "sweep", "features": "features", "compare": "features", "regress": "features", "merge": "merge"}
RECORD = "stages.json"


@dataclass
class ModelsConfig:
    """The study's models: trained from the zoo (one per seed, or the stratified pair's two halves), or loaded."""

    train: Any | None = None  # a studies.train.TrainRunConfig (arch, epochs, ...): train one model per seed
    seeds: list[int] = field(default_factory=list)  # one model per seed
    parts: list[str] = field(default_factory=list)  # the stratified pair (000 App. B): model k trains on parts[k]
    checkpoints: list[str] = field(default_factory=list)  # or: load these (the reference first)
    arch: str | None = None  # for checkpoints without a mergescope sidecar
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class StudyConfig:
    """The whole study: data, models and which analyses to run (``None``: not run), each with its own config.

    ``sweep`` is a (SweepConfig, stats_images) pair, ``merge`` a (MergeConfig, stats_images) pair; ``features``,
    ``compare`` and ``regress`` are the probe's, the comparison's and the regression's configs.
    """

    out: str
    data: str
    models: ModelsConfig
    split: str = "train"
    eval_splits: Sequence[str] = ("test",)
    device: str = "cpu"
    sweep: tuple | None = None
    features: Any | None = None
    compare: Any | None = None
    regress: Any | None = None
    merge: tuple | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # the resolved config as given (for the record)

    def enabled(self) -> list[str]:
        """The stages this study runs, in order."""
        on = {"train": bool(self.models.seeds or self.models.parts), "sweep": self.sweep is not None,
              "features": self.features is not None, "compare": self.compare is not None,
              "regress": self.regress is not None, "merge": self.merge is not None}
        for stage in ("compare", "regress"):
            if on[stage] and not on["features"]:
                raise MergescopeError(f"study: [{stage}] needs [features] (the probe it compares)")
        return [s for s in STAGES if on[s]]


def _key(material: Mapping) -> str:
    return hashlib.sha256(dumps({"mergescope": package_version(), **material}).encode()).hexdigest()


@dataclass
class StudyOutcome:
    """What :func:`run_folder` did: per stage "ran" or "cached", and where the overview is."""

    stages: dict[str, str]
    report: Path
    root: Path
    seconds: dict[str, float] = field(default_factory=dict)


def run_folder(config: StudyConfig, *, only: str | None = None, start: str | None = None, progress: bool = False,
               say: Callable[[str], None] = print) -> StudyOutcome:
    """Run the study into ``config.out``: every enabled stage whose stored key is not its current one.

    Args:
        only: run just this stage (forced); the stages it reads must be stored and valid.
        start: rerun this stage and every enabled stage after it (forced); earlier ones as needed.
        say: where the per-stage lines go.
    """
    from ..data import open_dataset
    from ..train import checkpoint_sha256

    stages = config.enabled()
    for name, opt in (("--only", only), ("--from", start)):
        if opt is not None and opt not in stages:
            raise MergescopeError(f"{name} {opt}: not a stage of this study; its stages: {', '.join(stages)}")
    root = Path(config.out)
    tags, paths = _model_paths(config, root)  # everything checked before the folder is touched
    if "train" in stages:
        _train_material(config)
    images = open_dataset(config.data, split=config.split)
    with RunLock(sibling(root, "lock"), root):
        record_path = root / RECORD
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        forced = {only} if only else set(stages[stages.index(start):]) if start else set()
        done: dict[str, str] = {}
        seconds: dict[str, float] = {}
        keys: dict[str, str] = {}
        base = {"data": images.fingerprint, "split": config.split, "device": config.device}
        digests: list[str | None] = []  # the checkpoints' sha256, read once (again after training)

        def hashes() -> list[str | None]:
            if not digests:
                digests.extend(checkpoint_sha256(p) if p.is_file() else None for p in paths)
            return digests

        for i, stage in enumerate(stages, start=1):
            if stage == "train":
                material = {"stage": "train", **base, "models": _train_material(config)}
            else:
                material = {"stage": stage, **base, "config": _stage_config(config, stage),
                            "eval_splits": list(config.eval_splits), "upstream": [keys[n] for n in NEEDS[stage]
                                                                                   if n in keys],
                            "checkpoints": hashes()}
            keys[stage] = _key(material)
            stored = record.get(stage, {}).get("key") == keys[stage] and _present(root, stage, hashes,
                                                                                  record.get(stage, {}))
            if stored and stage not in forced:
                done[stage] = "cached"
                say(f"[{i}/{len(stages)}] {stage}: stored result still valid (key {keys[stage][:12]})")
                continue
            if only and stage != only:
                if stage in _upstream(only) and not stored:
                    raise MergescopeError(f"--only {only}: stage {stage}, which it reads, is not stored or out of "
                                          f"date; run the study without --only first")
                continue
            say(f"[{i}/{len(stages)}] {stage}: running")
            t0, mark = time.perf_counter(), since_here()
            _run_stage(stage, config, root, tags, paths, progress)
            seconds[stage] = time.perf_counter() - t0
            # every stage that reads this one is out of date now, whatever its key says
            for later in stages[i:]:
                if stage in NEEDS[later] and later != stage:
                    record.pop(later, None)
            record[stage] = {"key": keys[stage], "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "seconds": round(seconds[stage], 3), "time_by_stage": record_since(mark)}
            if stage == "train":
                digests.clear()
                record[stage]["sha256"] = hashes()
            write_json(record_path, record)
            done[stage] = "ran"
            say(f"[{i}/{len(stages)}] {stage}: done in {seconds[stage]:.1f} s")
        write_json(root / "study.json", {"config": config.options, "stages": stages,
                                         "models": dict(zip(tags, map(str, paths)))})
        report = _overview(root)
    return StudyOutcome(done, report, root, seconds)


def _upstream(stage: str) -> set[str]:
    """Every stage ``stage`` reads, directly or not."""
    out: set[str] = set()
    for n in NEEDS[stage]:
        out |= {n, *_upstream(n)}
    return out


def _model_paths(config: StudyConfig, root: Path) -> tuple[list[str], list[Path]]:
    m = config.models
    if m.checkpoints:
        if m.seeds or m.parts:
            raise MergescopeError("study: [models] takes checkpoints or seeds (to train), not both")
        paths = [Path(c) for c in m.checkpoints]
    else:
        n = max(len(m.seeds), len(m.parts))
        if n < 2:
            raise MergescopeError("study: [models] needs at least two models: seeds = [0, 1, ...] (or parts = "
                                  "[\"a\", \"b\"]) to train, or checkpoints = [...]")
        paths = [root / "checkpoints" / f"model_{t}.safetensors" for t in model_tags(n)]
    return model_tags(len(paths)), paths


def _train_material(config: StudyConfig) -> list[dict]:
    m = config.models
    n = max(len(m.seeds), len(m.parts))
    seeds = list(m.seeds) or [0] * n
    parts = list(m.parts) or [None] * n
    if len(seeds) != n or len(parts) != n:
        raise MergescopeError(f"study: [models] seeds ({len(m.seeds)}) and parts ({len(m.parts)}) must be as many")
    return [{**asdict(m.train), "seed": s, "part": p} for s, p in zip(seeds, parts)]


def _stage_config(config: StudyConfig, stage: str) -> Any:
    value = getattr(config, stage)
    if isinstance(value, tuple):
        return [asdict(value[0]), *value[1:]]
    return asdict(value)


def _present(root: Path, stage: str, hashes: Callable[[], list[str | None]], entry: Mapping) -> bool:
    """Whether a stage's stored result is there (trained checkpoints: there and unchanged since they were
    trained, by ``hashes()``, their sha256 or None for a missing file)."""
    if stage == "train":
        return None not in hashes() and hashes() == entry.get("sha256")
    folder = root / FOLDERS[stage]
    marker = {"compare": "compare.csv", "regress": "regression.csv"}.get(stage, "manifest.json")
    return (folder / marker).is_file()


def _inputs(config: StudyConfig, paths: Sequence[Path], out: Path, progress: bool,
            stats_images: int | None = None) -> StudyInputs:
    m = config.models
    return StudyInputs([str(p) for p in paths], config.data, str(out), arch=None if not m.checkpoints else m.arch,
                       arch_kwargs=m.arch_kwargs if m.checkpoints else {}, split=config.split,
                       eval_splits=list(config.eval_splits), stats_images=stats_images, device=config.device,
                       progress=progress, overwrite=True)


def _run_stage(stage: str, config: StudyConfig, root: Path, tags: list[str], paths: list[Path], progress: bool) -> None:
    from . import compare, merge, probe, regress, sweep, train

    if stage == "train":
        (root / "checkpoints").mkdir(parents=True, exist_ok=True)
        for tag, path, material in zip(tags, paths, _train_material(config)):
            cfg = train.TrainRunConfig(**material)
            train.run_file(path, config.data, cfg, split=config.split, device=config.device, progress=progress,
                           overwrite=True)
        return
    final = root / FOLDERS[stage]  # each command writes it as a whole
    if stage == "sweep":
        cfg, stats_images = config.sweep
        sweep.run_folder(_inputs(config, paths[:2], final, progress, stats_images), cfg,
                         options=config.options.get("sweep", {}))
    elif stage == "features":
        probe.run_folder(_inputs(config, paths, final, progress), config.features,
                         options=config.options.get("features", {}))
    elif stage == "compare":
        compare.run_folder(final, config.compare, device=config.device, progress=progress, overwrite=True,
                           options=config.options.get("compare", {}))
    elif stage == "regress":
        regress.run_folder(final, config.regress, device=config.device, progress=progress, overwrite=True,
                           options=config.options.get("regress", {}))
    elif stage == "merge":
        cfg, stats_images = config.merge
        merge.run_folder(_inputs(config, paths, final, progress, stats_images), cfg,
                         options=config.options.get("merge", {}))


def _overview(root: Path) -> Path:
    """The overview page over the stages' folders (``report.html``)."""
    from ..report.overview import render_overview

    return render_overview(root, _parts(root)).path


def _parts(root: Path) -> dict[str, Path]:
    return {name: root / name for name in ("sweep", "features", "merge") if (root / name / "results.json").is_file()}


def answers(root: str | os.PathLike) -> list[str]:
    """One line per question of the thesis (000 §3.2) with its answer: the numbers of the overview page
    (:func:`mergescope.report.overview.overview_context`), so the two never disagree."""
    from ..report.overview import overview_context

    root = Path(root)
    ctx = overview_context(root, _parts(root))
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    pts = lambda v: "—" if v is None else f"{100 * v:+.1f} pts"  # noqa: E731
    lines = []
    if (q1 := ctx.get("q1")) and q1.get("best"):
        b, base = q1["best"], q1.get("baseline")
        line = (f"Interpolation (Fig. 3.1, {q1['split']}): {b['method']} has accuracy barrier "
                f"{pts(b['accuracy_barrier'])} and {pct(b['midpoint_accuracy'])} at α = 0.5")
        if base:
            line += (f"; the direct average {pts(base['accuracy_barrier'])}, {pct(base['midpoint_accuracy'])} at "
                     "α = 0.5")
        lines.append(line)
    if (q2 := ctx.get("q2")) and q2.get("largest"):
        big = q2["largest"]
        lines.append(f"Partial merging (Fig. 3.2): the largest mean gap to random channels is {big['name']}, "
                     f"{big['order']}: {pts(big['mean_gap'])}; {q2['outside_total']} of {q2['interior_total']} "
                     "points outside the random band")
    metric = ctx.get("rules", {}).get("observation3", {}).get("metric")
    if (o1 := ctx.get("obs1")) and metric:
        shares = ", ".join(f"{ctx['labels'].get(m, m)} {pct(o1['pooled'][m].get(metric))}" for m in o1["models"])
        lines.append(f"Observation 1: matched channels judged similar by {ctx['consensus_metric']}: {shares} "
                     "(all layers, against the unmatched-channel null)")
    if o2 := ctx.get("obs2"):
        lines.append("Observation 2: unmatched channels whose merged top images are " +
                     " · ".join(f"{c} {pct(o2['pooled'].get(c))}" for c in ("A", "B", "mixed", "neither")))
    if o3 := ctx.get("obs3"):
        lines.append("Observation 3: " + " · ".join(f"{c} {pct(o3['pooled'].get(c))} (thesis {o3['thesis'][c]})"
                                                    for c in ("all similar", "most similar", "all dissimilar")))
    if (o4 := ctx.get("obs4")) and o4.get("ten") is not None:
        lines.append(f"Observation 4 (Fig. 3.5): recovered top-k of A at ≈10% of B's weights {o4['ten']:.3f} vs "
                     f"all weights {o4['full']:.3f} (mean over layers, held-out images)")
    if m := ctx.get("merge"):
        lines.append("N-model merge: " + "; ".join(
            f"{m['best'][split]} keeps {pct(s['mean_endpoint_accuracy'] + s['gap'][m['best'][split]])} {split} "
            f"accuracy, {pts(s['gap'][m['best'][split]])} vs the mean model" for split, s in m["summary"].items()))
    return lines
