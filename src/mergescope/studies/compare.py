"""The channel comparison of a feature study (issue "Compare channels"; thesis 000 §3.2.1–3.2.3).

Over the probe of a feature study (:func:`mergescope.studies.probe.run`: model A, the models aligned to it,
their merges), every channel of A is compared with the same channel of each aligned model — Kendall's τ on D′,
δ of the top-k images (CLIP, or the documented fallback embedder, never called CLIP), top-k overlap, matching
correlation — "similar" is judged against the null of unmatched channels, the thesis's Observations 1–3 are
counted, and optionally metric-guided partial merges are evaluated against random channel choices. :func:`run` does it with models in memory (the demo);
:func:`run_folder` does it for a finished run folder (``mergescope compare``).

Files written into the run folder: ``compare.csv`` (one row per pair × layer × channel,
:data:`mergescope.compare.COLUMNS`), ``partial_merge.csv`` (with partial merging), ``features/table_<layer>.html``
(sortable channel tables), ``figures/compare_<layer>.svg`` and ``figures/partial_merge.svg``; the feature pages
are re-rendered with the metrics beside every channel.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..compare import (
    DEFAULT_PARTNERS,
    DEFAULT_QUANTILE,
    METRICS,
    ComparePair,
    CompareResult,
    compare_models,
    write_compare_csv,
)
from ..align.store import ALIGNMENT_FILE, StoredAlignments, load_alignments
from ..data import ImageDataset, iter_batches, len_batches, open_dataset
from ..embed import EmbeddingCache, ImageEmbedder, create_embedder
from ..runs.csvio import write_rows
from ..errors import DatasetError, MergescopeError
from .probe import aligned_key, default_subset, render_views
from ..merge.partial import DEFAULT_FRACTIONS, group_scores, partial_merge_curves
from ..perm import PermSpec
from ..probe import ProbeResult
from ..probe.store import stored_config
from ..report.compare_pages import (
    annotate_recipes,
    compare_section_html,
    delta_label,
    model_label,
    render_channel_tables,
    render_histograms,
    render_partial_merge,
)
from ..timing import stage

SECTION_TITLE = "Channel comparison"
PARTIAL_COLUMNS = ("metric", "direction", "fraction", "seed", "channels", "accuracy", "loss")


@dataclass
class CompareConfig:
    """How to compare (all recorded in the run's manifest)."""

    embedder: str | None = None  # "clip" or "fallback"; None: "clip" when clip_weights is given, else "fallback"
    clip_model: str = "ViT-B-32"  # open_clip model name (OpenAI weights from a file: "ViT-B-32-quickgelu")
    clip_weights: str | None = None  # CLIP weights file, or an open_clip tag already in its cache ("openai")
    consensus_metric: str = "kendall_tau"  # Observations 2 and 3: whose null judgement decides "similar"
    null_quantile: float = DEFAULT_QUANTILE  # similar = beyond this quantile of the unmatched-channel null
    null_partners: int = DEFAULT_PARTNERS  # unmatched partners sampled per channel for the null (seeded)
    threshold: float = 0.5  # Observation 3's named variant "fixed_threshold": metric >= threshold (<= for δ)
    partial_merge: bool = False  # also evaluate metric-guided partial merges (thesis Fig. 3.2)
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS  # shares of each group's channels merged
    seeds: tuple[int, ...] = (0, 1, 2)  # random-channel baselines
    alpha: float = 0.5  # interpolation weight of A for merged channels
    eval_split: str = "test"  # split the partial merges are evaluated on (falls back to the probe's split)
    batch_size: int = 256  # images per batch in every pass

    @property
    def embedder_kind(self) -> str:
        kind = self.embedder or ("clip" if self.clip_weights else "fallback")
        if kind not in ("clip", "fallback"):
            raise MergescopeError(f"embedder must be 'clip' or 'fallback', got {kind!r}")
        return kind


@dataclass
class PartialMergeInputs:
    """What partial merging needs: model A, model B aligned to A, the spec, and evaluation data."""

    model_a: nn.Module
    aligned_b: nn.Module
    spec: PermSpec
    eval_data: ImageDataset
    pair: tuple[str, str]  # (reference, aligned model) in the probe whose metrics guide the choice
    split_note: str = ""  # said in the report when the evaluation split is not the one asked for


@dataclass
class CompareOutput:
    """What :func:`run` produced."""

    result: CompareResult
    section: dict  # {"title", "html"} for the run's report
    recipes: list[dict]  # feature-view recipes with the metrics in channel_info
    pages: list[dict]  # feature-page index (as render_views returns it)
    tables: list[dict]  # channel tables: {"layer", "channels", "href"}
    files: list[Path]
    partial_rows: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**self.result.to_json(), "tables": self.tables, "partial_merge": self.partial_rows,
                "timings": self.timings}


def make_embedder(config: CompareConfig, reference: nn.Module, dataset: ImageDataset, label: str = "A") -> ImageEmbedder:
    """The configured image embedder: CLIP (open_clip, local weights only) or the fallback — penultimate features
    of the reference model, named ``"fallback (penultimate features of model A (<arch>)), not CLIP"``."""
    if config.embedder_kind == "clip":
        return create_embedder("clip", model_name=config.clip_model, pretrained=config.clip_weights or "openai")
    arch = getattr(reference, "mergescope_arch", None)
    arch = arch["name"] if isinstance(arch, dict) else type(reference).__name__
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    return create_embedder("fallback", model=reference, label=f"model {label} ({arch})", mean=mean, std=std,
                           image_size=tuple(dataset.image_size))


def pairs_from_recipes(result: ProbeResult, recipes: Sequence[Mapping], reference: str,
                       tags: Sequence[str]) -> list[ComparePair]:
    """The pairs of a feature study: (``reference``, model ``tag`` aligned to it) for every aligned tag (as the
    run's stored alignment lists them), with the matching correlation stored in the views' ``channel_info``
    ("corr <tag>") and, for the model of the pairwise view, its first merged row (the permuted merge) for
    Observation 2."""
    aligned = [aligned_key(t) for t in tags]
    missing = [m for m in [reference, *aligned] if m not in result.models]
    if missing or not aligned:
        raise MergescopeError(f"the stored probe lacks the aligned models the run's alignment lists "
                              f"({', '.join(missing) or 'none aligned'}): redo the probe")
    merged_of: dict[str, tuple[str, str]] = {}
    correlation: dict[str, dict[str, list]] = {}
    for recipe in recipes:
        rows = recipe.get("rows", {})
        models = list(rows.values())
        merged = [(label, m) for label, m in rows.items() if m.startswith("merged_")]
        for m in models:
            if m in aligned and merged and m not in merged_of:
                merged_of[m] = merged[0]
        for layer, info in recipe.get("channel_info", {}).items():
            for t, m in zip(tags, aligned):
                if f"corr {t}" in info:
                    correlation.setdefault(m, {})[layer] = info[f"corr {t}"]
    return [ComparePair(reference, m, merged=merged_of.get(m, (None, None))[1],
                        merged_label=merged_of.get(m, (None, None))[0], correlation=correlation.get(m))
            for m in aligned]


def attach_subset(result: ProbeResult, subset: ProbeResult) -> ProbeResult:
    """``result`` with the D′ activations of ``subset`` (a later probe of some of the same models) attached.

    Raises:
        MergescopeError: a model of ``subset`` has other weights (state hash) than in ``result``, or the two
            probes saw different datasets or reductions.
    """
    if subset.dataset.get("fingerprint") != result.dataset.get("fingerprint") or subset.reduction != result.reduction:
        raise MergescopeError("the subset probe saw another dataset or reduction than the stored probe")
    probes = {}
    for model, layers in result.probes.items():
        if model in subset.probes:
            a = result.config.get("models", {}).get(model, {}).get("state_sha256")
            b = subset.config.get("models", {}).get(model, {}).get("state_sha256")
            if a != b:
                raise MergescopeError(f"model '{model}' of the subset probe has other weights than in the stored probe")
            layers = {name: dataclasses.replace(lp, subset=subset[model, name].subset) if name in subset.probes[model]
                      else lp for name, lp in layers.items()}
        probes[model] = layers
    return ProbeResult(probes, result.k, result.reduction, result.dataset, result.num_images, subset.subset_ids,
                       result.config, result.path)


def run(
    run_dir: str | Path,
    dataset: ImageDataset,
    result: ProbeResult,
    recipes: Sequence[Mapping],
    config: CompareConfig | None = None,
    *,
    embedder: ImageEmbedder | None = None,
    partial: PartialMergeInputs | None = None,
    alignment: StoredAlignments | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> CompareOutput:
    """Compare channels, write ``compare.csv`` and the comparison's pages; return the report section.

    Args:
        run_dir: the run folder of the feature study.
        dataset: the probed dataset (image ids index it).
        result: the feature study's probe, with D′ activations.
        recipes: the feature study's view recipes (merged rows and correlations are read from them); which model
            is aligned to which comes from the run's stored alignment (``alignment.safetensors``).
        config: comparison settings.
        embedder: the image embedder for δ (see :func:`make_embedder`); None: no δ.
        partial: inputs for metric-guided partial merging (None: skipped).
        alignment: which model is aligned to which (default: the run folder's ``alignment.safetensors``; without
            one, every model ``t`` whose aligned copy the probe holds, against the probe's first model, and no
            correlation null).

    Returns:
        A :class:`CompareOutput`; ``recipes`` carry the metrics and should replace the stored ones.
    """
    cfg = config or CompareConfig()
    run_dir = Path(run_dir)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if alignment is None and (run_dir / ALIGNMENT_FILE).is_file():
        alignment = load_alignments(run_dir / ALIGNMENT_FILE)
    if alignment is not None:
        pairs = pairs_from_recipes(result, recipes, alignment.reference, alignment.tags)
        pairs = [dataclasses.replace(p, correlation_matrix=alignment.correlations(t))  # the matching's null
                 for p, t in zip(pairs, alignment.tags)]
    else:  # a probe in memory, without its alignment: every model the probe holds aligned to its first
        reference = result.models[0]
        pairs = pairs_from_recipes(result, recipes, reference,
                                   [m for m in result.models if aligned_key(m) in result.models])
    cache = EmbeddingCache(embedder) if embedder is not None else None
    with stage("analysis"):  # τ, δ, overlap, correlation and categories (embedding the top images too)
        res = compare_models(result, pairs, embed=None if cache is None else (lambda ids: cache.get(ids, dataset)),
                             embedder_name=getattr(embedder, "name", ""), embedder_kind=getattr(embedder, "kind", ""),
                             consensus_metric=cfg.consensus_metric, threshold=cfg.threshold,
                             null_quantile=cfg.null_quantile, null_partners=cfg.null_partners)
    if res.embedder is not None:
        res.embedder["images_embedded"] = cache.computed
    files = [write_compare_csv(run_dir / "compare.csv", res.rows)]
    timings["metrics"] = time.perf_counter() - t0

    partial_rows, partial_view = [], None
    if partial is not None:
        t0 = time.perf_counter()
        partial_rows = partial_merge_study(res, partial, cfg, device=device, progress=progress)
        files.append(write_rows(run_dir / "partial_merge.csv", PARTIAL_COLUMNS, partial_rows))
        timings["partial merging"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    annotated = annotate_recipes(recipes, res)
    pages = render_views(run_dir, dataset, result, annotated)
    tables = render_channel_tables(run_dir, res)
    histograms = render_histograms(run_dir, res)
    if partial is not None:
        ref, model = partial.pair
        partial_view = render_partial_merge(run_dir, partial_rows, res,
                                            title=f"Partial merges of {ref} and {model_label(model)} aligned to {ref} (α = {cfg.alpha:g})")
        partial_view["note"] = (
            f"Per permutation group, the x% channels ranked first by a metric of {model_label(model)} vs {ref} are merged "
            f"(α = {cfg.alpha:g}: θ = α·θ_A + (1−α)·θ_B′, no REPAIR), the rest keep A's filter, bias and "
            f"normalisation; a layer's input weights belong to its own output channels, the classifier's columns "
            f"to the channel they read, and its bias is merged only at 100%. Channels with an undefined metric "
            f"(dead, constant on D′) are merged last. Evaluated on {partial.eval_data.name} "
            f"({len(partial.eval_data)} images{partial.split_note}).")
    notes = []
    if res.embedder is not None and res.embedder["kind"] != "clip":
        notes.append(f"{delta_label('fallback')} is the CLIP-δ formula on the fallback embeddings; for CLIP-δ "
                     "itself pass CLIP weights: mergescope compare RUN_DIR --clip-weights PATH --overwrite.")
    html = compare_section_html(res, tables, histograms, partial_view, notes=notes)
    timings["report"] = time.perf_counter() - t0
    files += [run_dir / t["href"] for t in tables] + [run_dir / h["src"] for h in histograms]
    if partial_view is not None:
        files.append(run_dir / partial_view["src"])
    return CompareOutput(res, {"title": SECTION_TITLE, "html": html}, annotated, pages, tables, files,
                         partial_rows, timings)


def partial_merge_study(res: CompareResult, partial: PartialMergeInputs, config: CompareConfig,
                        device: torch.device | str = "cpu", progress: bool = False) -> list[dict]:
    """Partial-merge curves of A and aligned B guided by each metric of the pair (τ, δ, overlap, correlation),
    per group (mean over its observed layers, :func:`mergescope.merge.group_scores`), with random baselines."""
    ref, model = partial.pair
    scores, defined, direction = {}, {}, {}
    layers = [s["layer"] for s in res.layers if (s["reference"], s["model"]) == (ref, model)]
    for metric, higher in METRICS.items():
        values, ok = {}, {}
        for layer in layers:
            v, good = res.values(ref, model, layer, metric)
            values[layer], ok[layer] = torch.from_numpy(v), torch.from_numpy(good)
        if not any(bool(o.any()) for o in ok.values()):
            continue  # e.g. no embedder, or no correlation recorded
        scores[metric], defined[metric] = group_scores(partial.spec, values, ok)
        direction[metric] = higher
    data = partial.eval_data
    return partial_merge_curves(partial.model_a, partial.aligned_b, partial.spec, scores,
                                iter_batches(data, config.batch_size), defined=defined, higher_is_similar=direction,
                                fractions=config.fractions, seeds=config.seeds, alpha=config.alpha, device=device,
                                progress=progress, total=len_batches(data, config.batch_size))


# -- a finished run folder -------------------------------------------------------------------------------------

def run_folder(run_dir: str | os.PathLike, config: CompareConfig | None = None, *,
               device: torch.device | str = "cpu", progress: bool = False, overwrite: bool = False,
               options: Mapping | None = None) -> CompareOutput:
    """The channel comparison of a finished ``mergescope probe`` or ``mergescope demo`` run folder.

    Reads ``results.json`` ("features": data, split, views), the stored probe (``probe/``), the stored alignment
    (``alignment.safetensors``: which model is aligned to which, and how — never matched again) and, when needed,
    the checkpoints it names (checked against the sha256 the alignment recorded). When the probe has no D′
    activations, probes the reference and the aligned models again with D′ into ``probe_subset/`` as the study did
    (an aligned model derived from its unaligned twin's pass; the aligned weights checked against the stored probe's
    hashes). Writes the comparison's files, adds the "Channel
    comparison" section to ``report.html`` and records the comparison in ``results.json`` and ``manifest.json``.

    Args:
        run_dir: the run folder.
        config: comparison settings.
        overwrite: replace an earlier comparison (``compare.csv``) in the folder.
        options: the resolved command-line options, recorded in the manifest.

    Example:
        >>> run_folder("runs/demo", CompareConfig(partial_merge=True), overwrite=True).result.observation3
    """
    from ..perm import build_spec, layer_orders, permute_model
    from ..probe import load_probe, probe, state_sha256
    from ..runs import add_to_run, write_run
    from ..timing import record_since, since_here
    from .common import open_feature_run

    mark = since_here()
    cfg = config or CompareConfig()
    cfg.embedder_kind  # noqa: B018 -- validate before any work
    folder = open_feature_run(run_dir, marker="compare.csv", holds="a comparison", overwrite=overwrite,
                              need_probe=True)
    run_dir, results, manifest = folder.path, folder.results, folder.manifest
    features, dataset = folder.features, folder.dataset
    with write_run(run_dir, adds=True) as staging:  # the comparison's files and the report, as a whole
        run_dir = staging.path
        start = time.perf_counter()
        stored = load_probe(run_dir / "probe")
        if stored.dataset.get("fingerprint") != dataset.fingerprint:
            raise MergescopeError(f"the stored probe was made on other images than {features['data']} "
                                  f"({features['split']}): dataset fingerprints differ")
        alignment = load_alignments(run_dir / ALIGNMENT_FILE)
        reference, tags = alignment.reference, [alignment.reference, *alignment.tags]
        need_subset = stored.subset_ids is None
        models = folder.models(tags if need_subset or cfg.partial_merge else [reference], device, alignment)
        try:
            embedder = make_embedder(cfg, models[reference], dataset, reference)
        except MergescopeError as e:
            raise MergescopeError(f"{e} [command line: --clip-weights PATH, or --embedder fallback]") from None

        notes = ""
        aligned_models: dict[str, nn.Module] = {}
        spec = None
        if need_subset or cfg.partial_merge:
            spec = build_spec(models[reference], next(iter(iter_batches(dataset, 2))).x.to(device))
            for t in tags[1:]:  # the run's own alignment: never matched again
                aligned_models[aligned_key(t)] = permute_model(models[t], spec, alignment.perms(t))
                want = stored.config.get("models", {}).get(aligned_key(t), {}).get("state_sha256")
                if want is not None and state_sha256(aligned_models[aligned_key(t)]) != want:
                    raise MergescopeError(f"model {t} aligned to {reference} by the stored alignment has other weights "
                                          "than the stored probe's; the comparison would not describe the probed models")
        result = stored
        if need_subset:  # as the study probed: an aligned model's activations its unaligned twin's, re-indexed
            subjects, permuted = {reference: models[reference]}, {}
            for t in tags[1:]:
                aligned = aligned_key(t)
                orders = layer_orders(spec, alignment.perms(t), stored.layers[aligned])
                if orders is None or stored.layers.get(t) != stored.layers[aligned]:
                    subjects[aligned] = aligned_models[aligned]
                else:
                    subjects[t], subjects[aligned], permuted[aligned] = models[t], aligned_models[aligned], (t, orders)
            again = probe(subjects, dataset, layers={m: stored.layers[m] for m in subjects}, k=stored.k,
                          reduction=stored.reduction, batch_size=cfg.batch_size, subset_ids=default_subset(dataset),
                          device=device, progress=progress, run_dir=run_dir / "probe_subset",
                          precision=stored_config(stored.config)["precision"], permuted=permuted)  # as stored
            result = attach_subset(stored, again)

        partial = None
        if cfg.partial_merge:
            try:
                eval_data = open_dataset(features["data"], split=cfg.eval_split)
            except DatasetError:
                eval_data = dataset
                notes = f"; no '{cfg.eval_split}' split, so the probed '{features['split']}' images"
            b = aligned_key(tags[1])
            partial = PartialMergeInputs(models[reference], aligned_models[b], spec, eval_data, (reference, b), notes)

        out = run(run_dir, dataset, result, features["views"], cfg, embedder=embedder, partial=partial,
                  alignment=alignment, device=device, progress=progress)
        out.timings["total"] = time.perf_counter() - start

        results["features"] = {**features, "views": out.recipes}
        results["compare"] = {**out.to_json(), "config": dataclasses.asdict(cfg)}
        files = [*out.files, *(run_dir / p["href"] for p in out.pages)]
        if need_subset:
            files.append(run_dir / "probe_subset" / "probe.safetensors")
        add_to_run(run_dir, results, manifest, out.section, files, "compare",
                   {"config": dataclasses.asdict(cfg), "embedder": out.result.embedder, "timings": out.timings,
                    "reprobed_subset": need_subset, "options": dict(options or {}),
                    "time_by_stage": record_since(mark)})
    return out


__all__ = [
    "SECTION_TITLE",
    "CompareConfig",
    "CompareOutput",
    "PartialMergeInputs",
    "attach_subset",
    "run",
    "run_folder",
    "make_embedder",
    "pairs_from_recipes",
    "partial_merge_study",
]
