"""The feature study (seeds 000 §3.2.2–3.2.3): top-k images of every channel of many aligned models, in one pass.

Given a reference model A and other models of the same architecture, the others are aligned to A (activation
matching, one pass for all), optional merged models are added, every model — unaligned ones too — is probed in
one more pass (an aligned model's channels are its unaligned twin's, re-indexed: derived from the twin's probe,
not run), and the pairwise view (A, B before permutation, B aligned, merges) and the many-to-one view
(A and every model aligned to it) are rendered as feature pages. :func:`merged_pair` builds the merges the
pairwise view shows, and :func:`run_folder` makes the whole study of a set of checkpoints a run folder
(``mergescope probe``). The probed layers are the thesis's by default — convolutional channels and residual block
outputs (000 §3.1.3, App. C; :func:`mergescope.perm.select_layers`) — linear layers on request.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..align import MatchResult, match_many
from ..align.store import ALIGNMENT_FILE, save_alignments
from ..data import ImageDataset, iter_batches, len_batches, stratified_subset
from ..merge import interpolate_model, repair_and_reset
from ..perm import Perms, PermSpec, build_spec, layer_orders, permute_model, select_layers
from ..probe import ProbeResult, probe
from ..report.feature_views import matching_info, views_from_probe
from ..report.features import render_feature_pages
from ..timing import stage
from .common import StudyInputs, dataset_record, prepare
from .plan import match_models


def aligned_key(tag: str) -> str:
    """The probe's name for model ``tag`` permuted onto the reference."""
    return f"{tag}_aligned"


def run(
    run_dir: str | Path,
    dataset: ImageDataset,
    models: Mapping[str, nn.Module],
    matches: Mapping[str, MatchResult] | None = None,
    merged: Mapping[str, nn.Module] | None = None,
    spec: PermSpec | None = None,
    k: int = 10,
    reduction: str = "max",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = False,
    subset_ids=None,
    layers: str | Sequence[str] = "conv",
    sources: Mapping[str, Mapping[str, str]] | None = None,
    points: str = "stage_end",
    resume: bool = True,
    checkpoint_dir: str | Path | None = None,
    other_pass: str = "error",
    precision: str = "float32",
) -> tuple[ProbeResult, list[dict], list[dict]]:
    """Align every model to the first, probe them all in one pass, and write the feature pages.

    Args:
        run_dir: the run folder (``probe/`` and ``features/`` are written inside).
        dataset: the images to rank (usually the training set).
        models: tag -> model; the first is the reference A.
        matches: tag -> an existing alignment to A (e.g. from the interpolation sweep); missing ones are computed.
        merged: row label -> a merged model whose channels are A's (shown in the pairwise view).
        subset_ids: the fixed subset D′ whose activations the probe keeps (for Kendall's τ); default
            :func:`default_subset` (5,000 images, class-stratified, seed 0).
        layers: which layers to probe: ``"conv"`` (the thesis's: conv channels and residual block outputs),
            ``"all"`` or layer names (:func:`mergescope.perm.select_layers`).
        sources: tag -> {"checkpoint", "sha256"} of the models' files, recorded with the alignment.
        points: where residual streams are measured when matching here.
        resume: reuse a finished probe of the same config in ``run_dir/probe`` and continue an interrupted one
            (False: start over, replacing what is there).
        checkpoint_dir, other_pass: where the probe's pass checkpoints go and what one of another pass means
            (:func:`mergescope.probe.probe`).
        precision: the probe pass's forward, ``"float32"`` or ``"bfloat16"`` (:func:`mergescope.probe.probe`;
            the alignment is always computed in float32).

    Returns:
        The probe result, the index of feature pages ({"slug", "title", "layer", "channels", "href"}) and the
        JSON-able view recipes that :func:`render_views` turns into pages again.
    """
    run_dir = Path(run_dir)
    tags = list(models)
    ref = models[tags[0]]
    spec = spec or build_spec(ref, next(iter(iter_batches(dataset, 2))).x)
    matches = dict(matches or {})
    todo = [t for t in tags[1:] if t not in matches]
    if todo:
        found = match_many(ref, [models[t] for t in todo], spec, iter_batches(dataset, batch_size), device=device,
                           progress=progress, total=len_batches(dataset, batch_size), points=points)
        matches.update(zip(todo, found))
    with stage("writing"):
        save_alignments(run_dir / ALIGNMENT_FILE, spec, {t: matches[t] for t in tags[1:]}, reference=tags[0],
                        sources=sources, points=points)
    probe_layers = select_layers(spec, layers)
    probed, permuted = {tags[0]: ref}, {}
    for t in tags[1:]:
        probed[t] = models[t]
        probed[aligned_key(t)] = permute_model(models[t], spec, matches[t].perms)
        orders = layer_orders(spec, matches[t].perms, probe_layers)
        if orders is not None:  # its activations are t's, re-indexed: derived, not run (probe's ``permuted``)
            permuted[aligned_key(t)] = (t, orders)
    merged = dict(merged or {})
    keys = {label: f"merged_{i}" for i, label in enumerate(merged)}
    probed.update({keys[label]: m for label, m in merged.items()})
    subset_ids = default_subset(dataset) if subset_ids is None else subset_ids
    # every model at the reference's layers: channel c of each row is A's channel c (a merge REPAIRed with added
    # block-output layers has its own spec, whose block outputs are the corrected ones under the same names)
    result = probe(probed, dataset, layers=probe_layers, k=k, reduction=reduction, batch_size=batch_size,
                   device=device, run_dir=run_dir / "probe", progress=progress, subset_ids=subset_ids,
                   resume=resume, checkpoint_dir=checkpoint_dir, other_pass=other_pass, precision=precision,
                   permuted=permuted)

    info = matching_info(spec, matches, probe_layers)
    recipes = []
    if len(tags) >= 2:
        a, b = tags[0], tags[1]
        rows = {a: a, f"{b} (before permutation)": b, f"{b} aligned to {a}": aligned_key(b),
                **{label: keys[label] for label in merged}}
        recipes.append({
            "slug": "pair", "title": f"{a}, {b} and their merges", "rows": rows,
            "channel_info": {layer: {f"corr {b}": v[f"corr {b}"]} for layer, v in info.items() if f"corr {b}" in v},
            "note": f"Channel c of every row is {a}'s channel c after alignment, except '{b} (before permutation)', "
                    f"which shows {b}'s channel c as trained — usually a different feature."})
    if len(tags) >= 3:
        recipes.append({
            "slug": "many", "title": f"{len(tags)} models aligned to {tags[0]}", "channel_info": info,
            "rows": {f"{tags[0]} (reference)": tags[0], **{f"{t} aligned to {tags[0]}": aligned_key(t) for t in tags[1:]}},
            "note": "Every model is permuted onto the reference; rows that look alike mean a feature all models learned."})
    recipes = [{**r, "channel_info": {layer: {k: [float(x) for x in v] for k, v in d.items()}
                                      for layer, d in r["channel_info"].items()}} for r in recipes]
    return result, render_views(run_dir, dataset, result, recipes), recipes


SUBSET_IMAGES = 5000  # D′: the thesis's 5,000-image subset (000 §3.2.4 and A.3: "5000 images … i.e., 5 per class")


def default_subset(dataset: ImageDataset, size: int = SUBSET_IMAGES, seed: int = 0) -> np.ndarray:
    """D′ (DESIGN "Kendall-τ(c)"): ``size`` images spread evenly over the classes, fixed seed
    (:func:`~mergescope.data.stratified_subset`; capped by the dataset).

    The thesis does not size D′ for Kendall's τ; its only fixed subset is the regression's 5,000 ImageNet images
    (5 per class × 1,000 classes, 000 §3.2.4), so D′ has 5,000 images whatever the number of classes: 500 per
    class on CIFAR-10, all 1,437 images of the digits' train split.
    """
    return stratified_subset(dataset.targets, size, seed=seed)


def render_views(run_dir: str | Path, dataset: ImageDataset, result: ProbeResult, recipes: list[dict]) -> list[dict]:
    """Render feature pages from a probe and JSON-able view recipes (slug, title, rows, channel_info, note).

    The recipes are stored in a run's ``results.json``, so ``mergescope report`` can re-render the pages from the
    stored probe without touching a model.
    """
    views = []
    for r in recipes:
        info = {layer: {k: np.asarray(v) for k, v in d.items()} for layer, d in r.get("channel_info", {}).items()}
        views += views_from_probe(result, r["rows"], r["slug"], r["title"], channel_info=info, note=r.get("note", ""))
    return render_feature_pages(run_dir, dataset, views)


def merged_pair(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermSpec,
    perms: Perms,
    dataset: ImageDataset,
    alpha: float = 0.5,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, nn.Module]:
    """A and B merged at ``alpha``: B permuted onto A and interpolated, the same REPAIRed, and the direct average.

    Args:
        model_a, model_b: the reference and the model aligned to it (unaligned; both untouched).
        spec: the permutation spec of their architecture.
        perms: B's alignment to A (:attr:`MatchResult.perms`).
        dataset: the images REPAIR takes its statistics from (one pass).
        alpha: the weight of A: α·θ_A + (1−α)·θ_B.

    Returns:
        ``{"permuted", "permuted+repair", "naive"}`` -> merged model (new models), as a sweep's midpoint;
        :func:`merged_rows` labels them for :func:`run`.

    Example:
        >>> merged = merged_pair(a, b, spec, match.perms, train, alpha=0.5)
        >>> run("runs/x", train, {"A": a, "B": b}, merged=merged_rows(merged, 0.5))
    """
    aligned_b = permute_model(model_b, spec, perms)
    merged = {"permuted": interpolate_model(model_a, aligned_b, alpha),
              "permuted+repair": interpolate_model(model_a, aligned_b, alpha),
              "naive": interpolate_model(model_a, model_b, alpha)}
    repair_and_reset(model_a, aligned_b, spec, iter_batches(dataset, batch_size),
                     repair=[(alpha, merged["permuted+repair"])], device=device, progress=progress,
                     total=len_batches(dataset, batch_size))
    return merged


def merged_rows(midpoint: Mapping[str, nn.Module], alpha: float = 0.5) -> dict[str, nn.Module]:
    """Row labels for a sweep's merged models at the midpoint (permuted, +REPAIR, direct average)."""
    labels = {"permuted": f"merged (permuted, α={alpha:g})", "permuted+repair": f"merged + REPAIR (α={alpha:g})",
              "naive": f"direct average (α={alpha:g})"}
    return {labels[m]: midpoint[m] for m in ("permuted", "permuted+repair", "naive") if m in midpoint}


@dataclass
class ProbeConfig:
    """What ``mergescope probe`` ranks and merges (recorded in the run's manifest)."""

    k: int = 10  # images per channel
    reduction: str = "max"  # feature map -> one number per image: "max" or "mean"
    alpha: float | None = None  # also probe A and B merged at this α (permuted, + REPAIR, direct average)
    batch_size: int = 256
    subset_images: int = SUBSET_IMAGES  # D′: images whose activations the probe keeps (Kendall's τ)
    match_points: str = "stage_end"  # where a residual stream is matched: "stage_end" (the reference) or "all"
    matching: str = "activation"  # how the models are aligned to the reference: "activation" or "weight"
    layers: str | Sequence[str] = "conv"  # "conv" (the thesis's layers), "all", or layer names
    precision: str = "float32"  # the probe pass's forward: "float32" or "bfloat16" (autocast; alignment in float32)


def run_folder(inputs: StudyInputs, config: ProbeConfig | None = None, options: Mapping | None = None) -> dict:
    """The feature study of checkpoints as a run folder: align every model to the first, probe them all (and the
    merges of the first two at ``config.alpha``), write the feature pages, ``alignment.safetensors``,
    ``results.json``, the report and the manifest. Returns the results recorded in ``results.json``.

    Example:
        >>> run_folder(StudyInputs(["a.safetensors", "b.safetensors", "c.safetensors"], "digits", "runs/probe"))
    """
    from ..runs.jsonio import write_json
    from ..report import render_report
    from ..report.features import feature_index_html
    from ..runs import write_manifest, write_run
    from ..timing import record_since, since_here

    mark = since_here()
    cfg = config or ProbeConfig()
    device, progress = inputs.device, inputs.progress
    loaded, dataset, _ = prepare(inputs)
    a = loaded.models[0]
    spec = build_spec(a, next(iter(iter_batches(dataset, 2))).x.to(device))
    probe_layers = select_layers(spec, cfg.layers)  # an unknown layer name is refused before the folder is touched
    with write_run(inputs.out, overwrite=inputs.overwrite) as staging:  # only once every input is known to be good
        run_dir = staging.path
        tags = loaded.tags
        models = dict(zip(tags, loaded.models))
        found, _ = match_models(cfg.matching, a, [models[t] for t in tags[1:]], spec,
                                lambda: iter_batches(dataset, cfg.batch_size), len_batches(dataset, cfg.batch_size),
                                device, progress, cfg.match_points)
        matches = dict(zip(tags[1:], found))
        merged = {}
        if cfg.alpha is not None:
            pair = merged_pair(a, models["B"], spec, matches["B"].perms, dataset, cfg.alpha, batch_size=cfg.batch_size,
                               device=device, progress=progress)
            merged = merged_rows(pair, cfg.alpha)
        _, pages, recipes = run(run_dir, dataset, models, matches=matches, merged=merged, spec=spec, k=cfg.k,
                                reduction=cfg.reduction, batch_size=cfg.batch_size, device=device, progress=progress,
                                subset_ids=default_subset(dataset, cfg.subset_images), layers=probe_layers,
                                sources=loaded.sources(), points=cfg.match_points,
                                checkpoint_dir=staging.resume / "probe", other_pass="restart",
                                precision=cfg.precision)
        results = {
            "title": f"mergescope feature study: {len(models)} models on {dataset.name}",
            "headline": f"Top-{cfg.k} {dataset.name} images of every channel of {len(probe_layers)} layers, for "
                        f"{len(models)} models aligned to {Path(inputs.checkpoints[0]).name}.",
            "summary": {t: str(c) for t, c in zip(tags, inputs.checkpoints)} | {"dataset": f"{inputs.data} "
                                                                                f"({inputs.split})",
                                                                                "reduction": cfg.reduction,
                                                                                "precision": cfg.precision},
            "matching": matches["B"].summary(),
            "sections": [{"title": "Feature visualization", "html": feature_index_html(pages)}],
            "features": {"data": inputs.data, "split": inputs.split, "views": recipes},
        }
        with stage("writing"):
            files = [write_json(run_dir / "results.json", results), render_report(run_dir, results),
                     run_dir / ALIGNMENT_FILE, run_dir / "probe" / "probe.safetensors"]
        write_manifest(run_dir, {"probe": asdict(cfg), **inputs.record(), "options": dict(options or {})}, files,
                       models=loaded.record(), dataset=dataset_record(dataset), time_by_stage=record_since(mark))
    return results


__all__ = ["SUBSET_IMAGES", "ProbeConfig", "aligned_key", "default_subset", "merged_pair", "merged_rows", "run", "run_folder",
           "render_views"]
