"""The channel comparison of a probe: every metric for every channel of every layer of every model pair, as tidy
rows, with the per-layer summaries of the thesis's Observations 2 and 3 (000 §3.2.2, §3.2.3).

One row per (reference, model, layer, channel), columns :data:`COLUMNS`:

==================== ==========================================================================================
reference, model     probe model names: the reference A and a model aligned to it (e.g. ``"B_aligned"``)
layer, channel       canonical layer name, channel index (channel c of both models is one unit after alignment)
kendall_tau          Kendall's τ-b of the activations on D′ (:func:`~mergescope.compare.kendall_tau_b`); 0.0
                     where not defined
kendall_defined      False where a channel is constant on D′ in either model (a dead ReLU): τ-b is 0/0 there
clip_delta           δ(j) of the top-k images (:func:`~mergescope.compare.clip_delta`), embedded by ``embedder``;
                     0.0 where not defined, empty when no embedder was given
clip_delta_defined   False where δ is not defined (see :class:`~mergescope.compare.ClipDeltaResult`)
embedder             what embedded the images, e.g. ``"fallback (penultimate features of cnn_digits), not CLIP"``;
                     a δ is CLIP-δ only where ``embedder_kind`` is ``"clip"``
embedder_kind        ``"clip"`` or ``"fallback"`` (empty without an embedder)
overlap              |T_A ∩ T_B| / k of the top-k image ids (:func:`~mergescope.compare.topk_overlap`)
correlation          the matching correlation of the pair (Pearson, activation matching); empty where the
                     alignment recorded none (weight matching)
dead                 the channel's activation is constant over the whole dataset in A or in the model: its top-k
                     are ties ordered by id and carry no information (its overlap and δ are flagged, not trusted)
merged_model         the merged model Observation 2 looked at (empty: none given for this pair)
category             Observation 2 (:func:`~mergescope.compare.merged_categories`): ``matched``, ``A``, ``B``,
                     ``mixed``, ``neither``
category_embedding   Observation 2 by embedding similarity, where an embedder was given
                     (:func:`~mergescope.compare.merged_categories_embedding`): ``matched``, ``A``, ``B``,
                     ``mixed``, ``neither``, ``undefined``; embedded by ``embedder`` (``embedder_kind``: CLIP only
                     where ``"clip"``); empty without an embedder or a merged model
consensus            Observation 3 over all models aligned to this reference
                     (:func:`~mergescope.compare.consensus_categories`); empty with fewer than two such models
==================== ==========================================================================================

Nothing is NaN: an undefined value is 0.0 with its flag False. :func:`compare_models` only computes;
:func:`write_compare_csv` writes the rows.
"""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._csvio import write_rows
from ..errors import MergescopeError
from .categories import (
    CONSENSUS_CATEGORIES,
    consensus_categories,
    merged_categories,
    merged_categories_embedding_from_ids,
    metric_spread,
)
from .clip_delta import clip_delta_from_ids
from .kendall import kendall_tau_b
from .overlap import topk_overlap

COLUMNS = ("reference", "model", "layer", "channel", "kendall_tau", "kendall_defined", "clip_delta",
           "clip_delta_defined", "embedder", "embedder_kind", "overlap", "correlation", "dead", "merged_model",
           "category", "category_embedding", "consensus")
METRICS = {"kendall_tau": True, "clip_delta": False, "overlap": True, "correlation": True}  # name -> higher = similar
THESIS_OBSERVATION3 = {  # 000 §3.2.3, AlexNet on ImageNet, channels sorted by eye
    "source": "thesis 000 §3.2.3: AlexNet on ImageNet, judged by eye",
    "all similar": "5–10%", "most similar": "35–50%", "all dissimilar": "40–60%"}
_BOOL = ("kendall_defined", "clip_delta_defined", "dead")
_FLOAT = ("kendall_tau", "clip_delta", "overlap", "correlation")
_OPTIONAL = {"category_embedding": ""}  # columns added later: older CSVs without them read as this value


@dataclass(frozen=True)
class ComparePair:
    """A model aligned to a reference, as named in the probe.

    Attributes:
        reference: probe name of the reference A.
        model: probe name of the aligned model (channel c = A's channel c).
        merged: probe name of a merge of the two (for Observation 2), or None.
        merged_label: how reports call that merge (default: ``merged``).
        correlation: layer -> matched correlation per channel (``MatchResult.matched_similarity`` of the
            layer's group), or None.
    """

    reference: str
    model: str
    merged: str | None = None
    merged_label: str | None = None
    correlation: Mapping[str, Sequence[float]] | None = None


@dataclass
class CompareResult:
    """What :func:`compare_models` measured (JSON-ready via :meth:`to_json`).

    Attributes:
        rows: one dict per (reference, model, layer, channel) with :data:`COLUMNS`.
        layers: one summary per (reference, model, layer): channels, dead, defined counts, means of the metrics
            over usable channels (defined and not dead).
        observation2: one row per (reference, model, layer) with a merged model: the category counts and shares
            of :meth:`MergedCategories.shares`; with an embedder also ``"embedding"``: those of
            :meth:`EmbeddingCategories.shares` (Observation 2 by embedding similarity).
        observation3: one row per (reference, layer) with ≥ 2 aligned models: the consensus counts and shares.
        spread: ``{reference: {layer: {metric: {"mean": [C], "std": [C]}}}}`` across the aligned models.
        embedder: {"name", "kind", "images_embedded"} or None.
        rules: the thresholds used (Observation 2 rule, Observation 3 metric, threshold and direction).
        subset_size: |D′|.
    """

    rows: list[dict]
    layers: list[dict]
    observation2: list[dict]
    observation3: list[dict]
    spread: dict
    embedder: dict | None
    rules: dict
    subset_size: int
    thesis: dict = field(default_factory=lambda: dict(THESIS_OBSERVATION3))

    def values(self, reference: str, model: str, layer: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(float64 [C], bool [C] usable) of one metric for one pair and layer; usable = defined and not dead."""
        rows = [r for r in self.rows if (r["reference"], r["model"], r["layer"]) == (reference, model, layer)]
        if not rows:
            raise MergescopeError(f"no comparison of {model} with {reference} at layer {layer}")
        return _column(rows, metric)

    def to_json(self) -> dict:
        return {"layers": self.layers, "observation2": self.observation2, "observation3": self.observation3,
                "spread": self.spread, "embedder": self.embedder, "rules": self.rules,
                "subset_size": self.subset_size, "thesis": self.thesis}


def _column(rows: Sequence[Mapping], metric: str) -> tuple[np.ndarray, np.ndarray]:
    v = np.array([np.nan if r[metric] is None else float(r[metric]) for r in rows], dtype=np.float64)
    ok = np.isfinite(v) & ~np.array([bool(r["dead"]) for r in rows])
    flag = {"kendall_tau": "kendall_defined", "clip_delta": "clip_delta_defined"}.get(metric)
    if flag:
        ok &= np.array([bool(r[flag]) for r in rows])
    return v, ok


def compare_models(
    probe_result,
    pairs: Sequence[ComparePair | tuple[str, str]],
    *,
    layers: Sequence[str] | None = None,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
    embedder_name: str = "",
    embedder_kind: str = "",
    consensus_metric: str = "kendall_tau",
    threshold: float = 0.5,
    max_outliers: int = 2,
    match_threshold: float = 0.5,
    neither_min: float = 0.5,
    mixed_min: float = 0.2,
    close_min: float = 1.1,
    margin: float = 0.1,
) -> CompareResult:
    """Every channel metric for every pair × layer × channel of a probe, and the Observation 2/3 summaries.

    Args:
        probe_result: a :class:`~mergescope.probe.ProbeResult` holding the reference, the aligned models (with
            activations on D′: probe with ``subset_ids``) and any merged models.
        pairs: :class:`ComparePair` s, or ``(reference, model)`` tuples.
        layers: layers to compare (default: every layer probed in both models of a pair).
        embed: image ids (int64 [m]) -> embeddings [m, d] for CLIP-δ, e.g. ``lambda ids: cache.get(ids, ds)``
            with an :class:`~mergescope.embed.EmbeddingCache`; None leaves ``clip_delta`` empty.
        embedder_name, embedder_kind: what ``embed`` is (``ImageEmbedder.name`` / ``.kind``); written in every row.
        consensus_metric, threshold: Observation 3 — model m is similar to the reference on channel c when the
            metric (one of :data:`METRICS`) is ≥ threshold (≤ for ``clip_delta``); undefined or dead counts as
            dissimilar. ``max_outliers``: how many dissimilar models "most similar" allows.
        match_threshold, neither_min, mixed_min: the Observation 2 rule of
            :func:`~mergescope.compare.merged_categories`.
        close_min, margin: the Observation 2 rule by embedding similarity
            (:func:`~mergescope.compare.merged_categories_embedding`, same ``match_threshold``), used where
            ``embed`` is given.

    Returns:
        A :class:`CompareResult`.

    Example:
        >>> res = compare_models(result, [ComparePair("A", "B_aligned", merged="merged_0")],
        ...                      embed=lambda ids: cache.get(ids, ds), embedder_name=cache.name,
        ...                      embedder_kind=cache.embedder.kind)
        >>> write_compare_csv(run_dir / "compare.csv", res.rows)
    """
    if consensus_metric not in METRICS:
        raise MergescopeError(f"consensus_metric must be one of {', '.join(METRICS)}, got {consensus_metric!r}")
    if consensus_metric == "clip_delta" and embed is None:
        raise MergescopeError("consensus on clip_delta needs an embedder")
    pairs = [p if isinstance(p, ComparePair) else ComparePair(*p) for p in pairs]
    if not pairs:
        raise MergescopeError("compare_models needs at least one (reference, model) pair")
    if probe_result.subset_ids is None:
        raise MergescopeError("the probe holds no activations on a subset D′, which Kendall's τ needs: probe with "
                              "subset_ids=subset_per_class(dataset.targets, 5) (feature_study does by default)")
    o2_rule = {"match_threshold": match_threshold, "neither_min": neither_min, "mixed_min": mixed_min}
    o2e_rule = {"match_threshold": match_threshold, "close_min": close_min, "margin": margin}
    rows, layer_rows, obs2 = [], [], []
    for pair in pairs:
        names = [n for n in probe_result.layers.get(pair.reference, []) if n in probe_result.layers.get(pair.model, [])]
        for layer in (names if layers is None else [n for n in layers if n in names]):
            new, summary, cats, ecats = _compare_layer(probe_result, pair, layer, embed, embedder_name,
                                                       embedder_kind, o2_rule, o2e_rule)
            rows += new
            layer_rows.append(summary)
            if cats is not None:
                obs2.append({"reference": pair.reference, "model": pair.model,
                             "merged_model": pair.merged_label or pair.merged, "layer": layer, **cats.shares(),
                             **({"embedding": ecats.shares()} if ecats is not None else {})})
    obs3, spread = _consensus(rows, consensus_metric, threshold, max_outliers)
    rules = {"observation2": o2_rule, **({"observation2_embedding": o2e_rule} if embed is not None else {}),
             "observation3": {"metric": consensus_metric, "threshold": threshold,
                              "higher_is_similar": METRICS[consensus_metric], "max_outliers": max_outliers}}
    embedder = {"name": embedder_name, "kind": embedder_kind} if embed is not None else None
    return CompareResult(rows, layer_rows, obs2, obs3, spread, embedder, rules, len(probe_result.subset_ids))


def _compare_layer(result, pair: ComparePair, layer: str, embed, embedder_name: str, embedder_kind: str,
                   o2_rule: dict, o2e_rule: dict):
    ref, mod = result[pair.reference, layer], result[pair.model, layer]
    if ref.channels != mod.channels:
        raise MergescopeError(f"layer {layer}: {pair.reference} has {ref.channels} channels, {pair.model} "
                              f"{mod.channels}; compare aligned models of one architecture")
    if ref.subset is None or mod.subset is None:
        raise MergescopeError(f"no D′ activations for layer {layer} of {pair.reference} or {pair.model}")
    c = ref.channels
    tau = kendall_tau_b(ref.subset, mod.subset)  # [C]
    overlap = topk_overlap(ref.topk_ids, mod.topk_ids)  # [C]
    dead = (ref.std == 0) | (mod.std == 0)  # constant over every image seen
    delta = clip_delta_from_ids(ref.topk_ids, mod.topk_ids, embed) if embed is not None else None
    corr = None
    if pair.correlation is not None and pair.correlation.get(layer) is not None:
        corr = np.asarray(pair.correlation[layer], dtype=np.float64)
        if corr.shape != (c,):
            raise MergescopeError(f"correlation of layer {layer} has shape {corr.shape}, expected ({c},)")
    cats = ecats = None
    if pair.merged is not None:
        merged_ids = result[pair.merged, layer].topk_ids
        cats = merged_categories(ref.topk_ids, mod.topk_ids, merged_ids, **o2_rule)
        if embed is not None:
            ecats = merged_categories_embedding_from_ids(ref.topk_ids, mod.topk_ids, merged_ids, embed, **o2e_rule)
    names = cats.names() if cats is not None else None
    enames = ecats.names() if ecats is not None else None
    rows = []
    for j in range(c):
        rows.append({
            "reference": pair.reference, "model": pair.model, "layer": layer, "channel": j,
            "kendall_tau": float(tau.tau[j]), "kendall_defined": bool(tau.defined[j]),
            "clip_delta": None if delta is None else float(delta.delta[j]),
            "clip_delta_defined": False if delta is None else bool(delta.defined[j]),
            "embedder": embedder_name if delta is not None else "",
            "embedder_kind": embedder_kind if delta is not None else "",
            "overlap": float(overlap[j]),
            "correlation": None if corr is None or not math.isfinite(corr[j]) else float(corr[j]),
            "dead": bool(dead[j]),
            "merged_model": (pair.merged_label or pair.merged) if cats is not None else "",
            "category": names[j] if names is not None else "",
            "category_embedding": enames[j] if enames is not None else "",
            "consensus": "",
        })
    summary = {"reference": pair.reference, "model": pair.model, "layer": layer, "channels": c,
               "dead": int(dead.sum()), "kendall_defined": int(tau.defined.sum()),
               "clip_delta_defined": 0 if delta is None else int(delta.defined.sum())}
    for metric in METRICS:
        v, ok = _column(rows, metric)
        summary[f"mean_{metric}"] = float(v[ok].mean()) if ok.any() else None
        summary[f"usable_{metric}"] = int(ok.sum())
    return rows, summary, cats, ecats


def _consensus(rows: list[dict], metric: str, threshold: float, max_outliers: int) -> tuple[list[dict], dict]:
    """Observation 3 per (reference, layer) with ≥ 2 aligned models; fills the rows' ``consensus`` column."""
    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for r in rows:
        groups.setdefault((r["reference"], r["layer"]), {}).setdefault(r["model"], []).append(r)
    table, spread = [], {}
    for (reference, layer), by_model in groups.items():
        per_model = list(by_model.values())
        if len(per_model) < 2:
            continue
        stats, cats = {}, None
        for name, higher in METRICS.items():
            cols = [_column(m, name) for m in per_model]
            v = torch.from_numpy(np.stack([np.nan_to_num(x, nan=0.0) for x, _ in cols]))  # [n−1, C]
            ok = torch.from_numpy(np.stack([o for _, o in cols]))  # [n−1, C] usable
            if name == metric:
                cats = consensus_categories(v, threshold, higher_is_similar=higher, defined=ok,
                                            max_outliers=max_outliers)
            if ok.any():
                s = metric_spread(v, ok)
                stats[name] = {"mean": s.mean.tolist(), "std": s.std.tolist(), "count": s.count.tolist()}
        spread.setdefault(reference, {})[layer] = stats
        for m in per_model:
            for r, name in zip(m, cats.names()):
                r["consensus"] = name
        table.append({"reference": reference, "layer": layer, "models": len(per_model), **cats.shares()})
    return table, spread


def write_compare_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write comparison rows with :data:`COLUMNS` atomically: floats in shortest round-trip form, flags as
    ``true``/``false``, missing values (None) as empty cells — never NaN."""
    return write_rows(path, COLUMNS, rows)


def read_compare_csv(path: str | os.PathLike) -> list[dict]:
    """Rows written by :func:`write_compare_csv`, typed back (floats, bools, int channel, None for empty)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or []) and c not in _OPTIONAL]
        if missing:
            raise MergescopeError(f"{path}: comparison CSV lacks column(s) {', '.join(missing)}")
        rows = []
        for r in reader:
            for col, empty in _OPTIONAL.items():
                r.setdefault(col, empty)
            r["channel"] = int(r["channel"])
            for col in _FLOAT:
                r[col] = float(r[col]) if r[col] != "" else None
            for col in _BOOL:
                r[col] = r[col] == "true"
            rows.append(r)
    return rows


__all__ = [
    "COLUMNS",
    "CONSENSUS_CATEGORIES",
    "METRICS",
    "THESIS_OBSERVATION3",
    "ComparePair",
    "CompareResult",
    "compare_models",
    "read_compare_csv",
    "write_compare_csv",
]
