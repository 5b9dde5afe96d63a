"""The channel comparison of a probe: every metric for every channel of every layer of every model pair, as tidy
rows, with the per-layer summaries of the thesis's Observations 1–3 (000 §3.2.2, §3.2.3).

"Similar" is judged against a null (DESIGN "Similar", :mod:`.null`): per (reference, model, layer) and metric, the
metric between A's channel j and ``null_partners`` seeded unmatched channels p ≠ j of the aligned model; similar =
beyond the pool's ``null_quantile`` (q-quantile where higher is similar, (1 − q)-quantile for CLIP-δ).
Observation 1 = share of a layer's channels similar under each metric; Observation 2 (:func:`merged_categories_null`)
and Observation 3 (:func:`consensus_from_similar`) use the judgement of ``consensus_metric``. The earlier rules
are kept as named variants: Observation 2 by image-id overlap (``category_id_overlap``), by embedding similarity
(``category_embedding``) and Observation 3 with a fixed threshold (``consensus_fixed_threshold``).

One row per (reference, model, layer, channel), columns :data:`COLUMNS`:

=========================== ===================================================================================
reference, model            probe model names: the reference A and a model aligned to it (e.g. ``"B_aligned"``)
layer, channel              canonical layer name, channel index (channel c of both models is one unit after
                            alignment)
kendall_tau                 Kendall's τ-b of the activations on D′ (:func:`~mergescope.compare.kendall_tau_b`);
                            0.0 where not defined
kendall_defined             False where a channel is constant on D′ in either model (a dead ReLU)
clip_delta                  δ(j) of the top-k images, the thesis's formula (:func:`~mergescope.compare.clip_delta`,
                            variant ``"thesis"``), embedded by ``embedder``; 0.0 where not defined, empty without
                            an embedder
clip_delta_defined          False where δ is not defined (see :class:`~mergescope.compare.ClipDeltaResult`)
clip_delta_distinct_images  the named variant ``"distinct_images"`` of δ (every C over distinct images only)
clip_delta_distinct_images_defined  its flag
embedder                    what embedded the images, e.g. ``"fallback (penultimate features of cnn_digits), not
                            CLIP"``; a δ is CLIP-δ only where ``embedder_kind`` is ``"clip"``
embedder_kind               ``"clip"`` or ``"fallback"`` (empty without an embedder)
overlap                     |T_A ∩ T_B| / k of the top-k image ids (:func:`~mergescope.compare.topk_overlap`)
correlation                 the matching correlation of the pair; empty where the alignment recorded none
dead                        the channel is constant over the whole dataset in A or in the model
similar_<metric>            beyond the layer's null threshold for that metric (``true``/``false``); empty where
                            the value is not usable (undefined, dead) or the metric has no null
null_threshold_<metric>     that threshold (the same on every row of the layer); empty: no null
null_quantile               q
merged_model                the merged model Observation 2 looked at (empty: none given for this pair)
category                    Observation 2 against the null (:func:`merged_categories_null`): ``matched``, ``A``,
                            ``B``, ``mixed``, ``neither``, ``undefined``
category_id_overlap         Observation 2, named variant by image id (:func:`merged_categories`)
category_embedding          Observation 2, named variant by embedding similarity
                            (:func:`merged_categories_embedding`); empty without an embedder or a merged model
consensus                   Observation 3 against the null over all models aligned to this reference
                            (:func:`consensus_from_similar`); empty with fewer than two such models
consensus_fixed_threshold   Observation 3, named variant: ``consensus_metric`` ≥ ``threshold``
                            (:func:`consensus_categories`)
=========================== ===================================================================================

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

from ..runs.csvio import write_rows
from ..errors import MergescopeError
from .categories import (
    CONSENSUS_CATEGORIES,
    consensus_categories,
    consensus_from_similar,
    merged_categories,
    merged_categories_embedding_from_ids,
    merged_categories_null,
    metric_spread,
)
from .clip_delta import clip_delta_from_ids
from .null import DEFAULT_PARTNERS, DEFAULT_QUANTILE, NullThreshold, check_quantile, null_threshold, unmatched_partners
from .pair_metrics import METRICS, pair_values

_SIMILAR = tuple(f"similar_{m}" for m in METRICS)
_THRESHOLDS = tuple(f"null_threshold_{m}" for m in METRICS)
COLUMNS = ("reference", "model", "layer", "channel", "kendall_tau", "kendall_defined", "clip_delta",
           "clip_delta_defined", "clip_delta_distinct_images", "clip_delta_distinct_images_defined", "embedder",
           "embedder_kind", "overlap", "correlation", "dead", *_SIMILAR, *_THRESHOLDS, "null_quantile",
           "merged_model", "category", "category_id_overlap", "category_embedding", "consensus",
           "consensus_fixed_threshold")
THESIS_OBSERVATION3 = {  # 000 §3.2.3, AlexNet on ImageNet, channels sorted by eye
    "source": "thesis 000 §3.2.3: AlexNet on ImageNet, judged by eye",
    "all similar": "5–10%", "most similar": "35–50%", "all dissimilar": "40–60%"}
_BOOL = ("kendall_defined", "clip_delta_defined", "clip_delta_distinct_images_defined", "dead")
_TRISTATE = _SIMILAR  # true / false / empty (None)
_FLOAT = ("kendall_tau", "clip_delta", "clip_delta_distinct_images", "overlap", "correlation", *_THRESHOLDS,
          "null_quantile")
# columns added later: older CSVs without them read as this value
_OPTIONAL = {"category_embedding": "", "clip_delta_distinct_images": "", "clip_delta_distinct_images_defined": "",
             **{c: "" for c in (*_SIMILAR, *_THRESHOLDS)}, "null_quantile": "", "category_id_overlap": "",
             "consensus_fixed_threshold": ""}


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
        correlation_matrix: layer -> [C, C] correlation of A's channel j with the *aligned* model's channel p
            (``MatchResult.similarity[group][:, perm]``), or None; gives the correlation's null (without it the
            correlation has none, and no ``similar_correlation``).
    """

    reference: str
    model: str
    merged: str | None = None
    merged_label: str | None = None
    correlation: Mapping[str, Sequence[float]] | None = None
    correlation_matrix: Mapping[str, np.ndarray] | None = None


@dataclass
class CompareResult:
    """What :func:`compare_models` measured (JSON-ready via :meth:`to_json`).

    Attributes:
        rows: one dict per (reference, model, layer, channel) with :data:`COLUMNS`.
        layers: one summary per (reference, model, layer) — Observation 1: channels, dead, defined counts, means
            of the metrics over usable channels, and per metric the null (``null_<metric>``:
            :meth:`NullThreshold.to_dict`), ``n_similar_<metric>`` and ``share_similar_<metric>`` (of the
            layer's channels; None without a null).
        observation2: one row per (reference, model, layer) with a merged model: the counts and shares of the
            null rule (:meth:`NullCategories.shares`, with ``"nulls"``: the three thresholds it used), and the
            named variants ``"id_overlap"`` (:meth:`MergedCategories.shares`) and, with an embedder,
            ``"embedding"`` (:meth:`EmbeddingCategories.shares`).
        observation3: one row per (reference, layer) with ≥ 2 aligned models: the consensus counts and shares of
            the null rule, with ``"thresholds"`` (model -> the null threshold used) and the named variant
            ``"fixed_threshold"``.
        spread: ``{reference: {layer: {metric: {"mean": [C], "std": [C]}}}}`` across the aligned models.
        embedder: {"name", "kind", "images_embedded"} or None.
        rules: the rules used (null, Observation 2 rules, Observation 3 metric and thresholds).
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


@dataclass(frozen=True)
class _Null:
    quantile: float
    partners: int
    seed: int


def compare_models(
    probe_result,
    pairs: Sequence[ComparePair | tuple[str, str]],
    *,
    layers: Sequence[str] | None = None,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
    embedder_name: str = "",
    embedder_kind: str = "",
    consensus_metric: str = "kendall_tau",
    null_quantile: float = DEFAULT_QUANTILE,
    null_partners: int = DEFAULT_PARTNERS,
    null_seed: int = 0,
    threshold: float = 0.5,
    max_outliers: int = 2,
    match_threshold: float = 0.5,
    neither_min: float = 0.5,
    mixed_min: float = 0.2,
    close_min: float = 1.1,
    margin: float = 0.1,
) -> CompareResult:
    """Every channel metric for every pair × layer × channel of a probe, and the Observation 1–3 summaries.

    Args:
        probe_result: a :class:`~mergescope.probe.ProbeResult` holding the reference, the aligned models (with
            activations on D′: probe with ``subset_ids``) and any merged models.
        pairs: :class:`ComparePair` s, or ``(reference, model)`` tuples.
        layers: layers to compare (default: every layer probed in both models of a pair).
        embed: image ids (int64 [m]) -> embeddings [m, d] for CLIP-δ, e.g. ``lambda ids: cache.get(ids, ds)``
            with an :class:`~mergescope.embed.EmbeddingCache`; None leaves ``clip_delta`` empty.
        embedder_name, embedder_kind: what ``embed`` is (``ImageEmbedder.name`` / ``.kind``); written in every row.
        consensus_metric: the metric (one of :data:`METRICS`) whose null judgement decides Observations 2 and 3.
        null_quantile, null_partners, null_seed: the null (:mod:`~mergescope.compare.null`): q, unmatched
            partners per channel, and the seed of their sample.
        threshold, max_outliers: Observation 3's named variant "fixed_threshold" — similar when
            ``consensus_metric`` ≥ threshold (≤ for ``clip_delta``); ``max_outliers`` (both rules): how many
            dissimilar models "most similar" allows.
        match_threshold, neither_min, mixed_min: Observation 2's named variant "id_overlap"
            (:func:`~mergescope.compare.merged_categories`).
        close_min, margin: Observation 2's named variant by embedding similarity
            (:func:`~mergescope.compare.merged_categories_embedding`, same ``match_threshold``), where ``embed``
            is given.

    Returns:
        A :class:`CompareResult`.

    Example:
        >>> res = compare_models(result, [ComparePair("A", "B_aligned", merged="merged_0")],
        ...                      embed=lambda ids: cache.get(ids, ds), embedder_name=cache.name,
        ...                      embedder_kind=cache.embedder.kind, null_quantile=0.95)
        >>> write_compare_csv(run_dir / "compare.csv", res.rows)
    """
    if consensus_metric not in METRICS:
        raise MergescopeError(f"consensus_metric must be one of {', '.join(METRICS)}, got {consensus_metric!r}")
    if consensus_metric == "clip_delta" and embed is None:
        raise MergescopeError("consensus on clip_delta needs an embedder")
    check_quantile(null_quantile)
    null = _Null(null_quantile, null_partners, null_seed)
    unmatched_partners(2, null_partners)  # validates null_partners
    pairs = [p if isinstance(p, ComparePair) else ComparePair(*p) for p in pairs]
    if not pairs:
        raise MergescopeError("compare_models needs at least one (reference, model) pair")
    if probe_result.subset_ids is None:
        raise MergescopeError("the probe holds no activations on a subset D′, which Kendall's τ needs: probe with "
                              "subset_ids=default_subset(dataset) (5,000 images; studies.probe.run does by default)")
    o2_rule = {"match_threshold": match_threshold, "neither_min": neither_min, "mixed_min": mixed_min}
    o2e_rule = {"match_threshold": match_threshold, "close_min": close_min, "margin": margin}
    rows, layer_rows, obs2 = [], [], []
    for pair in pairs:
        names = [n for n in probe_result.layers.get(pair.reference, []) if n in probe_result.layers.get(pair.model, [])]
        for layer in (names if layers is None else [n for n in layers if n in names]):
            new, summary, o2 = _compare_layer(probe_result, pair, layer, embed, embedder_name, embedder_kind,
                                              o2_rule, o2e_rule, null, consensus_metric)
            rows += new
            layer_rows.append(summary)
            if o2 is not None:
                obs2.append(o2)
    obs3, spread = _consensus(rows, consensus_metric, threshold, max_outliers)
    similar_rule = {"null": "the metric between A's channel j and unmatched channels p ≠ j of the other model, "
                            "same layer", "quantile": null_quantile, "partners": null_partners, "seed": null_seed,
                    "beyond": {m: "> q-quantile" if h else "< (1−q)-quantile" for m, h in METRICS.items()}}
    rules = {"similar": similar_rule,
             "observation2": {"rule": "null", "metric": consensus_metric},
             "observation2_id_overlap": o2_rule,
             **({"observation2_embedding": o2e_rule} if embed is not None else {}),
             "observation3": {"rule": "null", "metric": consensus_metric, "quantile": null_quantile,
                              "higher_is_similar": METRICS[consensus_metric], "max_outliers": max_outliers},
             "observation3_fixed_threshold": {"metric": consensus_metric, "threshold": threshold,
                                              "higher_is_similar": METRICS[consensus_metric],
                                              "max_outliers": max_outliers},
             "clip_delta": {"variant": "thesis", "named_variants": ["distinct_images"]}}
    embedder = {"name": embedder_name, "kind": embedder_kind} if embed is not None else None
    return CompareResult(rows, layer_rows, obs2, obs3, spread, embedder, rules, len(probe_result.subset_ids))


@dataclass(frozen=True)
class _Judged:
    """One metric between two probed layers: matched values, and the null judgement of them."""

    values: np.ndarray  # [C]
    defined: np.ndarray  # [C]
    dead: np.ndarray  # [C]
    null: NullThreshold
    similar: list[bool | None]


def _judge(metric: str, x, y, null: _Null, embed, correlation: np.ndarray | None) -> _Judged | None:
    """``metric`` between x's and y's channel j (matched) and its null over unmatched partners p ≠ j."""
    c = x.channels
    diag = torch.arange(c)
    partners = unmatched_partners(c, null.partners, null.seed)  # [C, m]
    rows, cols = diag[:, None].expand_as(partners).reshape(-1), partners.reshape(-1)
    matched = pair_values(metric, x, y, diag, diag, embed=embed, correlation=correlation)
    if matched is None:
        return None
    values, defined, dead = matched
    nv, nd, ndead = pair_values(metric, x, y, rows, cols, embed=embed, correlation=correlation)
    thr = null_threshold(metric, nv, nd & ~ndead, higher_is_similar=METRICS[metric], quantile=null.quantile,
                         partners=partners.shape[1])
    return _Judged(values, defined, dead, thr, thr.similar(values, defined & ~dead))


def _compare_layer(result, pair: ComparePair, layer: str, embed, embedder_name: str, embedder_kind: str,
                   o2_rule: dict, o2e_rule: dict, null: _Null, consensus_metric: str):
    ref, mod = result[pair.reference, layer], result[pair.model, layer]
    if ref.channels != mod.channels:
        raise MergescopeError(f"layer {layer}: {pair.reference} has {ref.channels} channels, {pair.model} "
                              f"{mod.channels}; compare aligned models of one architecture")
    if ref.subset is None or mod.subset is None:
        raise MergescopeError(f"no D′ activations for layer {layer} of {pair.reference} or {pair.model}")
    c = ref.channels
    matrix = None if pair.correlation_matrix is None else pair.correlation_matrix.get(layer)
    if matrix is not None:
        matrix = np.asarray(matrix, dtype=np.float64)
        if matrix.shape != (c, c):
            raise MergescopeError(f"correlation matrix of layer {layer} has shape {matrix.shape}, expected ({c}, {c})")
    corr = None
    if pair.correlation is not None and pair.correlation.get(layer) is not None:
        corr = np.asarray(pair.correlation[layer], dtype=np.float64)
        if corr.shape != (c,):
            raise MergescopeError(f"correlation of layer {layer} has shape {corr.shape}, expected ({c},)")
    elif matrix is not None:
        corr = np.diag(matrix).copy()
    judged = {m: _judge(m, ref, mod, null, embed, matrix) for m in METRICS}
    tau, delta, overlap = judged["kendall_tau"], judged["clip_delta"], judged["overlap"]
    dead = overlap.dead  # constant over every image seen, in A or in the model
    distinct = (clip_delta_from_ids(ref.topk_ids, mod.topk_ids, embed, variant="distinct_images")
                if embed is not None else None)

    cats = ecats = ncats = None
    o2 = None
    if pair.merged is not None:
        mer = result[pair.merged, layer]
        cats = merged_categories(ref.topk_ids, mod.topk_ids, mer.topk_ids, **o2_rule)
        if embed is not None:
            ecats = merged_categories_embedding_from_ids(ref.topk_ids, mod.topk_ids, mer.topk_ids, embed, **o2e_rule)
        ab = judged[consensus_metric]
        am = _judge(consensus_metric, ref, mer, null, embed, None)
        bm = _judge(consensus_metric, mod, mer, null, embed, None)
        if ab is not None and am is not None and bm is not None:
            nulls = {"A~B": ab.null.to_dict(), "A~M": am.null.to_dict(), "B~M": bm.null.to_dict()}
            ncats = merged_categories_null(ab.similar, am.similar, bm.similar,
                                           {"metric": consensus_metric, "quantile": null.quantile, "nulls": nulls})
        o2 = {"reference": pair.reference, "model": pair.model, "merged_model": pair.merged_label or pair.merged,
              "layer": layer, "metric": consensus_metric,
              **(ncats.shares() if ncats is not None else {}), "nulls": ncats.rule["nulls"] if ncats else None,
              "id_overlap": cats.shares(), **({"embedding": ecats.shares()} if ecats is not None else {})}
    names = [cats.names() if cats else None, ecats.names() if ecats else None, ncats.names() if ncats else None]
    rows = []
    for j in range(c):
        row = {
            "reference": pair.reference, "model": pair.model, "layer": layer, "channel": j,
            "kendall_tau": float(tau.values[j]), "kendall_defined": bool(tau.defined[j]),
            "clip_delta": None if delta is None else float(delta.values[j]),
            "clip_delta_defined": False if delta is None else bool(delta.defined[j]),
            "clip_delta_distinct_images": None if distinct is None else float(distinct.delta[j]),
            "clip_delta_distinct_images_defined": False if distinct is None else bool(distinct.defined[j]),
            "embedder": embedder_name if delta is not None else "",
            "embedder_kind": embedder_kind if delta is not None else "",
            "overlap": float(overlap.values[j]),
            "correlation": None if corr is None or not math.isfinite(corr[j]) else float(corr[j]),
            "dead": bool(dead[j]),
        }
        for m, jd in judged.items():
            row[f"similar_{m}"] = None if jd is None else jd.similar[j]
            row[f"null_threshold_{m}"] = None if jd is None else jd.null.threshold
        row["null_quantile"] = null.quantile
        row["merged_model"] = (pair.merged_label or pair.merged) if cats is not None else ""
        row["category"] = names[2][j] if names[2] is not None else ""
        row["category_id_overlap"] = names[0][j] if names[0] is not None else ""
        row["category_embedding"] = names[1][j] if names[1] is not None else ""
        row["consensus"] = row["consensus_fixed_threshold"] = ""
        rows.append(row)
    summary = {"reference": pair.reference, "model": pair.model, "layer": layer, "channels": c,
               "dead": int(dead.sum()), "kendall_defined": int(tau.defined.sum()),
               "clip_delta_defined": 0 if delta is None else int(delta.defined.sum()),
               "null_quantile": null.quantile}
    for metric, jd in judged.items():
        v, ok = _column(rows, metric)
        summary[f"mean_{metric}"] = float(v[ok].mean()) if ok.any() else None
        summary[f"usable_{metric}"] = int(ok.sum())
        has_null = jd is not None and jd.null.threshold is not None
        n_similar = sum(1 for s in (jd.similar if jd else []) if s)
        summary[f"null_{metric}"] = jd.null.to_dict() if jd is not None else None
        summary[f"n_similar_{metric}"] = n_similar if has_null else None
        summary[f"share_similar_{metric}"] = n_similar / c if has_null and c else None
    return rows, summary, o2


def _consensus(rows: list[dict], metric: str, threshold: float, max_outliers: int) -> tuple[list[dict], dict]:
    """Observation 3 per (reference, layer) with ≥ 2 aligned models; fills the rows' ``consensus`` (null rule:
    ``similar_<metric>``, undefined counted dissimilar) and ``consensus_fixed_threshold`` columns."""
    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for r in rows:
        groups.setdefault((r["reference"], r["layer"]), {}).setdefault(r["model"], []).append(r)
    table, spread = [], {}
    for (reference, layer), by_model in groups.items():
        per_model = list(by_model.values())
        if len(per_model) < 2:
            continue
        stats, fixed = {}, None
        for name, higher in METRICS.items():
            cols = [_column(m, name) for m in per_model]
            v = torch.from_numpy(np.stack([np.nan_to_num(x, nan=0.0) for x, _ in cols]))  # [n−1, C]
            ok = torch.from_numpy(np.stack([o for _, o in cols]))  # [n−1, C] usable
            if name == metric:
                fixed = consensus_categories(v, threshold, higher_is_similar=higher, defined=ok,
                                             max_outliers=max_outliers)
            if ok.any():
                s = metric_spread(v, ok)
                stats[name] = {"mean": s.mean.tolist(), "std": s.std.tolist(), "count": s.count.tolist()}
        spread.setdefault(reference, {})[layer] = stats
        thresholds = {m[0]["model"]: m[0][f"null_threshold_{metric}"] for m in per_model}
        has_null = all(t is not None for t in thresholds.values())
        cats = None
        if has_null:
            similar = torch.tensor([[bool(r[f"similar_{metric}"]) for r in m] for m in per_model])
            cats = consensus_from_similar(similar, max_outliers=max_outliers, rule={"metric": metric})
        for m in per_model:
            for j, r in enumerate(m):
                r["consensus"] = cats.names()[j] if cats is not None else ""
                r["consensus_fixed_threshold"] = fixed.names()[j]
        table.append({"reference": reference, "layer": layer, "models": len(per_model), "metric": metric,
                      **(cats.shares() if cats is not None else {"channels": len(per_model[0])}),
                      "thresholds": thresholds, "fixed_threshold": fixed.shares()})
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
            for col in _TRISTATE:
                r[col] = None if r[col] == "" else r[col] == "true"
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
