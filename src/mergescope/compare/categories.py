"""Channel categories of the thesis's Observations 2 and 3 (000 §3.2.2, §3.2.3), by explicit, tunable rules.

Observation 2 (merged model): where aligned B does not match A on channel c, do the merged model's top-k images
come from A, from B, from both, or from neither? Observation 3 (n models aligned to one reference): is channel c
similar in all of them, in most, or in none? The thesis sorted channels by eye; these rules make the sorting
reproducible.

Default rules judge "similar" against the null of :mod:`.null` (:func:`merged_categories_null`,
:func:`consensus_from_similar`). Named variants: the image-id rule of Observation 2 (:func:`merged_categories`,
"id_overlap"), its embedding-similarity rule (:func:`merged_categories_embedding`), and Observation 3 with a
fixed threshold (:func:`consensus_categories`, "fixed_threshold").
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import MergescopeError
from .clip_delta import (
    _check_same_id_same_embedding,
    _ids,
    _masked_mean,
    _shared_id_pairs,
    _unit_rows,
    lookup_embeddings,
)
from .overlap import first_occurrence, member, topk_overlap

MERGED_CATEGORIES = ("matched", "A", "B", "mixed", "neither")
NULL_CATEGORIES = ("matched", "A", "B", "mixed", "neither", "undefined")
EMBEDDING_CATEGORIES = ("matched", "A", "B", "mixed", "neither", "undefined")
CONSENSUS_CATEGORIES = ("all similar", "most similar", "few similar", "all dissimilar")


@dataclass(frozen=True)
class MergedCategories:
    """Observation 2 for one layer: a category per channel and the counts it was decided from.

    Attributes:
        category: int64 [C], index into :data:`MERGED_CATEGORIES`.
        overlap_ab: float64 [C], |T_A ∩ T_B| / k.
        from_a_only, from_b_only, from_both, from_neither: int64 [C], how many of the merged model's top-k
            images lie in T_A only, in T_B only, in both, in neither.
        k: top-k size.
        rule: the thresholds used (JSON-ready).
    """

    category: torch.Tensor
    overlap_ab: torch.Tensor
    from_a_only: torch.Tensor
    from_b_only: torch.Tensor
    from_both: torch.Tensor
    from_neither: torch.Tensor
    k: int
    rule: dict

    def names(self) -> list[str]:
        """The category name of every channel."""
        return [MERGED_CATEGORIES[i] for i in self.category.tolist()]

    def shares(self) -> dict:
        """Counts per category, and the shares of "A"/"B"/"mixed"/"neither" among the unmatched channels."""
        return _unmatched_shares(self.category, MERGED_CATEGORIES)


def merged_categories(ids_a: torch.Tensor, ids_b: torch.Tensor, ids_merged: torch.Tensor, *,
                      match_threshold: float = 0.5, neither_min: float = 0.5,
                      mixed_min: float = 0.2) -> MergedCategories:
    """Observation 2: classify where the merged model's top-k images come from, by image id.

    Rule, per channel c, with k the row width and counts over the merged model's distinct top-k ids T_M:
      n_a = |T_M ∩ T_A \\ T_B|, n_b = |T_M ∩ T_B \\ T_A|, n_ab = |T_M ∩ T_A ∩ T_B|, n_0 = the rest of T_M.

    1. "matched"  if |T_A ∩ T_B| / k ≥ match_threshold (aligned B matches A; not classified further);
    2. "neither"  if n_0 / k ≥ neither_min (most merged top images belong to neither model);
    3. "mixed"    if n_a / k ≥ mixed_min and n_b / k ≥ mixed_min (substantial from both);
    4. "A" if n_a > n_b, "B" if n_b > n_a, otherwise "mixed".

    Args:
        ids_a, ids_b, ids_merged: int [C, k] top-k ids of channel c in A, in aligned B and in the merged
            model; -1 = padding.
        match_threshold, neither_min, mixed_min: the thresholds above, as fractions of k.

    Returns:
        :class:`MergedCategories`.
    """
    ids_a, ids_b, ids_m = (torch.as_tensor(t).long() for t in (ids_a, ids_b, ids_merged))
    if not (ids_a.shape == ids_b.shape == ids_m.shape) or ids_a.ndim != 2:
        raise MergescopeError(f"ids of A, B and merged must all be [C, k]; got {tuple(ids_a.shape)}, "
                              f"{tuple(ids_b.shape)}, {tuple(ids_m.shape)}")
    k = ids_a.shape[1]
    overlap = topk_overlap(ids_a, ids_b)
    distinct = first_occurrence(ids_m)
    in_a, in_b = member(ids_m, ids_a), member(ids_m, ids_b)
    n_a = (distinct & in_a & ~in_b).sum(1)
    n_b = (distinct & in_b & ~in_a).sum(1)
    n_ab = (distinct & in_a & in_b).sum(1)
    n_0 = (distinct & ~in_a & ~in_b).sum(1)
    code = {name: i for i, name in enumerate(MERGED_CATEGORIES)}
    cat = torch.where(n_a > n_b, code["A"], torch.where(n_b > n_a, code["B"], code["mixed"]))
    cat = torch.where((n_a >= mixed_min * k) & (n_b >= mixed_min * k), code["mixed"], cat)
    cat = torch.where(n_0 >= neither_min * k, code["neither"], cat)
    cat = torch.where(overlap >= match_threshold, code["matched"], cat)
    rule = {"match_threshold": match_threshold, "neither_min": neither_min, "mixed_min": mixed_min}
    return MergedCategories(cat.long(), overlap, n_a, n_b, n_ab, n_0, k, rule)


def category_table(layers: dict[str, MergedCategories]) -> list[dict]:
    """Per-layer share table of Observation 2: one JSON-ready row per layer (see :meth:`MergedCategories.shares`)."""
    return [{"layer": name, **result.shares()} for name, result in layers.items()]


@dataclass(frozen=True)
class EmbeddingCategories:
    """Observation 2 by embedding similarity for one layer (see :func:`merged_categories_embedding`).

    Attributes:
        category: int64 [C], index into :data:`EMBEDDING_CATEGORIES`.
        sim_a, sim_b: float64 [C], C(T_M, T_A) and C(T_M, T_B) (0.0 where no pair).
        baseline: float64 [C], mean_{p≠j} C(T_A(j), T_A(p)) (as in CLIP-δ).
        rel_a, rel_b: float64 [C], sim_a / baseline and sim_b / baseline (0.0 where undefined).
        defined: bool [C], False where the relative similarities are not (category "undefined", unless matched).
        rule: the thresholds used (JSON-ready).
    """

    category: torch.Tensor
    sim_a: torch.Tensor
    sim_b: torch.Tensor
    baseline: torch.Tensor
    rel_a: torch.Tensor
    rel_b: torch.Tensor
    defined: torch.Tensor
    rule: dict

    def names(self) -> list[str]:
        """The category name of every channel."""
        return [EMBEDDING_CATEGORIES[i] for i in self.category.tolist()]

    def shares(self) -> dict:
        """Counts per category, and the shares of "A"/"B"/"mixed"/"neither"/"undefined" among the unmatched
        channels (the same denominator as :meth:`MergedCategories.shares`)."""
        return _unmatched_shares(self.category, EMBEDDING_CATEGORIES)


def _unmatched_shares(category: torch.Tensor, names: tuple[str, ...]) -> dict:
    """Counts per category (names[0] is "matched") and the shares of the others among the unmatched channels."""
    counts = {name: int((category == i).sum()) for i, name in enumerate(names)}
    unmatched = len(category) - counts["matched"]
    return {"channels": len(category), "matched": counts["matched"], "unmatched": unmatched,
            **{f"n_{n}": counts[n] for n in names[1:]},
            **{f"share_{n}": (counts[n] / unmatched if unmatched else None) for n in names[1:]}}


@dataclass(frozen=True)
class NullCategories:
    """Observation 2 judged against the null, for one layer (see :func:`merged_categories_null`).

    Attributes:
        category: int64 [C], index into :data:`NULL_CATEGORIES`.
        rule: the metric, quantile and thresholds used (JSON-ready).
    """

    category: torch.Tensor
    rule: dict

    def names(self) -> list[str]:
        return [NULL_CATEGORIES[i] for i in self.category.tolist()]

    def shares(self) -> dict:
        """Counts per category and the shares of "A"/"B"/"mixed"/"neither"/"undefined" among unmatched channels."""
        return _unmatched_shares(self.category, NULL_CATEGORIES)


def merged_categories_null(matched: Sequence[bool | None], from_a: Sequence[bool | None],
                           from_b: Sequence[bool | None], rule: dict | None = None) -> NullCategories:
    """Observation 2 with one judgement of "similar" (beyond the null's quantile, :mod:`.null`) for every set.

    Per channel j, with M the merged model and "~" = similar under one metric against its own null
    (m(X_j, Y_p), p ≠ j, in the same layer):

      ``matched``  A_j ~ B_j (Observation 1: aligned B matches A; not classified further);
      ``A``        M_j ~ A_j and not M_j ~ B_j (images of one model dominate: thesis case 1);
      ``B``        M_j ~ B_j and not M_j ~ A_j;
      ``mixed``    M_j ~ A_j and M_j ~ B_j (images of both models appear: case 2);
      ``neither``  neither (most images belong to neither model: case 3);
      ``undefined`` a judgement it needs is undefined (a dead channel, an undefined metric).

    For CLIP-δ, "M_j ~ X_j" is δ with X's self-similarity and denominator, T_M as the second set; for τ, τ-b of
    M's and X's channel j on D′; for overlap, |T_X ∩ T_M| / k.

    Args:
        matched, from_a, from_b: per channel, the judgements A_j ~ B_j, A_j ~ M_j, B_j ~ M_j (None = undefined).
        rule: recorded as is.
    """
    code = {name: i for i, name in enumerate(NULL_CATEGORIES)}
    out = []
    for ab, a, b in zip(matched, from_a, from_b, strict=True):
        if ab:
            out.append(code["matched"])
        elif ab is None or a is None or b is None:
            out.append(code["undefined"])
        else:
            out.append(code["mixed" if a and b else "A" if a else "B" if b else "neither"])
    return NullCategories(torch.tensor(out, dtype=torch.long), dict(rule or {}))


def merged_categories_embedding(emb_a: torch.Tensor, emb_b: torch.Tensor, emb_m: torch.Tensor, *,
                                ids_a: torch.Tensor, ids_b: torch.Tensor, ids_m: torch.Tensor,
                                match_threshold: float = 0.5, close_min: float = 1.1, margin: float = 0.1,
                                eps: float = 1e-8) -> EmbeddingCategories:
    """Observation 2 by embedding similarity: is the merged model's top-k *semantically* A's, B's, both or neither?

    With C(X, Y) the mean cosine similarity over pairs of distinct images (x ∈ X, y ∈ Y, ids differ) — the C of
    CLIP-δ (:mod:`.clip_delta`) — per channel j:

      s_A = C(T_M(j), T_A(j)),  s_B = C(T_M(j), T_B(j)),  b = mean_{p≠j} C(T_A(j), T_A(p))  (δ's denominator),
      r_A = s_A / b,  r_B = s_B / b   (1 = as close as A's top-k of an average other channel of the layer).

    Rule (T_X is "close" when r_X ≥ close_min):

    1. "matched"   if |T_A ∩ T_B| / k ≥ match_threshold (by id, as :func:`merged_categories`; not classified);
    2. "undefined" if b ≤ eps (a relative scale needs a positive baseline), a one-channel layer (no p ≠ j), or
       no distinct pair in C(T_M, T_A), C(T_M, T_B) or the baseline;
    3. "neither"   if r_A < close_min and r_B < close_min (close to neither set);
    4. "A"         if r_A − r_B ≥ margin (clearly closer to A, and close to A by 3.);
    5. "B"         if r_B − r_A ≥ margin;
    6. "mixed"     otherwise (close to at least one, and about as close to both).

    Args:
        emb_a, emb_b, emb_m: [C, k, d] embeddings of T_A(j), T_B(j) (aligned B) and T_M(j) (merged); raw or
            normalised (rows are L2-normalised here).
        ids_a, ids_b, ids_m: int [C, k] image ids of those rows; -1 = padding (row ignored). Rows with equal
            ids must carry equal embeddings.
        match_threshold: as in :func:`merged_categories`.
        close_min: r_X at which T_M counts as close to T_X (default 1.1: 10 % above the layer's baseline).
        margin: how much larger r_A must be than r_B (or the reverse) for "A" (or "B").
        eps: a baseline ≤ eps is undefined.

    Returns:
        :class:`EmbeddingCategories` (float64, on the device of ``emb_a``).
    """
    embs = [torch.as_tensor(e) for e in (emb_a, emb_b, emb_m)]
    if any(e.ndim != 3 for e in embs) or len({e.shape[0] for e in embs}) != 1 or len({e.shape[2] for e in embs}) != 1:
        raise MergescopeError("merged_categories_embedding needs emb_a, emb_b, emb_m of shape [C, k, d] with one C "
                              f"and d; got {', '.join(str(tuple(e.shape)) for e in embs)}")
    device = embs[0].device
    ids = [_ids(i, e, n) for i, e, n in zip((ids_a, ids_b, ids_m), embs, ("ids_a", "ids_b", "ids_m"))]
    valid = [i >= 0 for i in ids]
    a, b, m = (_unit_rows(e.to(device, torch.float64), v, n) for e, v, n in zip(embs, valid, ("emb_a", "emb_b", "emb_m")))
    _check_same_id_same_embedding(torch.cat(ids, 1), torch.cat([a, b, m], 1))
    ia, ib, im = ids
    va, vb, vm = valid

    def cross(x, y, ix, iy, vx, vy):
        mask = vx[:, :, None] & vy[:, None, :] & (ix[:, :, None] != iy[:, None, :])
        return _masked_mean(x @ y.transpose(1, 2), mask)

    sim_a, n_ma = cross(m, a, im, ia, vm, va)
    sim_b, n_mb = cross(m, b, im, ib, vm, vb)
    channels = a.shape[0]
    sums = a.sum(1)
    same = _shared_id_pairs(ia)
    sizes = va.sum(1).double()
    dot, pairs = sums @ sums.T - same, sizes[:, None] * sizes[None, :] - same
    others = (pairs > 0) & ~torch.eye(channels, dtype=torch.bool, device=device)
    n_other = others.sum(1)
    baseline = torch.where(others, dot / pairs.clamp_min(1), torch.zeros_like(dot)).sum(1) / n_other.clamp_min(1)
    defined = (n_ma > 0) & (n_mb > 0) & (n_other > 0) & (baseline > eps)
    safe = torch.where(defined, baseline, torch.ones_like(baseline))
    rel_a = torch.where(defined, sim_a / safe, torch.zeros_like(sim_a))
    rel_b = torch.where(defined, sim_b / safe, torch.zeros_like(sim_b))
    code = {name: i for i, name in enumerate(EMBEDDING_CATEGORIES)}
    cat = torch.full((channels,), code["mixed"], dtype=torch.long, device=device)
    cat = torch.where(rel_b - rel_a >= margin, code["B"], cat)
    cat = torch.where(rel_a - rel_b >= margin, code["A"], cat)
    cat = torch.where((rel_a < close_min) & (rel_b < close_min), code["neither"], cat)
    cat = torch.where(defined, cat, code["undefined"])
    cat = torch.where(topk_overlap(ia, ib).to(device) >= match_threshold, code["matched"], cat)
    rule = {"match_threshold": match_threshold, "close_min": close_min, "margin": margin}
    return EmbeddingCategories(cat.long(), sim_a, sim_b, baseline, rel_a, rel_b, defined, rule)


def merged_categories_embedding_from_ids(ids_a: torch.Tensor, ids_b: torch.Tensor, ids_m: torch.Tensor,
                                         embed: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
                                         **rule) -> EmbeddingCategories:
    """:func:`merged_categories_embedding` from top-k ids and an embedding lookup (a table [N, d] or a function
    int64 ids [m] -> [m, d], e.g. an :class:`~mergescope.embed.EmbeddingCache`); each distinct id is looked up
    once. ``rule``: match_threshold, close_min, margin, eps."""
    ids = [torch.as_tensor(i).long() for i in (ids_a, ids_b, ids_m)]
    if any(i.ndim != 2 for i in ids) or len({i.shape[0] for i in ids}) != 1:
        raise MergescopeError(f"ids must be [C, k] with one C; got {', '.join(str(tuple(i.shape)) for i in ids)}")
    parts = lookup_embeddings(embed, *ids)
    return merged_categories_embedding(*parts, ids_a=ids[0], ids_b=ids[1], ids_m=ids[2], **rule)


def embedding_category_table(layers: dict[str, EmbeddingCategories]) -> list[dict]:
    """Per-layer share table of Observation 2 by embedding similarity (see :meth:`EmbeddingCategories.shares`)."""
    return [{"layer": name, **result.shares()} for name, result in layers.items()]


@dataclass(frozen=True)
class ConsensusCategories:
    """Observation 3 for one layer.

    Attributes:
        category: int64 [C], index into :data:`CONSENSUS_CATEGORIES`.
        similar_count: int64 [C], how many of the n−1 aligned models are similar to the reference on channel c.
        models: n−1.
        rule: the threshold and direction used (JSON-ready).
    """

    category: torch.Tensor
    similar_count: torch.Tensor
    models: int
    rule: dict

    def names(self) -> list[str]:
        return [CONSENSUS_CATEGORIES[i] for i in self.category.tolist()]

    def shares(self) -> dict:
        """Count and share of channels per category."""
        c = len(self.category)
        counts = {name: int((self.category == i).sum()) for i, name in enumerate(CONSENSUS_CATEGORIES)}
        return {"channels": c, **{f"n_{n}": v for n, v in counts.items()},
                **{f"share_{n}": (v / c if c else None) for n, v in counts.items()}}


def consensus_categories(similarity: torch.Tensor, threshold: float, *, higher_is_similar: bool = True,
                         defined: torch.Tensor | None = None, max_outliers: int = 2) -> ConsensusCategories:
    """Observation 3: with n models aligned to a reference, is each channel similar in all, most or none of them?

    Model m counts as similar on channel c when ``similarity[m, c] >= threshold`` (or ``<= threshold`` with
    ``higher_is_similar=False``, e.g. for CLIP-δ, where lower means more similar); an undefined value counts as
    dissimilar. With s the number of similar models out of n−1:

      "all similar"    s = n−1;
      "most similar"   1 ≤ n−1−s ≤ max_outliers and s ≥ 1 (all but one or two, the thesis's wording);
      "all dissimilar" s = 0;
      "few similar"    anything else (more than ``max_outliers`` dissimilar, but not all; the thesis names no
                       such case).

    Args:
        similarity: [n−1, C] a per-channel metric of each aligned model against the reference (τ, overlap,
            CLIP-δ, correlation).
        threshold: where "similar" starts.
        higher_is_similar: direction of the metric.
        defined: optional bool [n−1, C] (e.g. ``KendallResult.defined`` stacked).
        max_outliers: how many dissimilar models "most similar" allows.

    Returns:
        :class:`ConsensusCategories`.
    """
    sim = torch.as_tensor(similarity)
    if sim.ndim != 2 or sim.shape[0] < 1:
        raise MergescopeError(f"similarity must be [n-1, C] with n-1 >= 1; got {tuple(sim.shape)}")
    similar = sim >= threshold if higher_is_similar else sim <= threshold
    if defined is not None:
        similar &= torch.as_tensor(defined, dtype=torch.bool, device=sim.device)
    rule = {"threshold": threshold, "higher_is_similar": higher_is_similar, "max_outliers": max_outliers}
    return consensus_from_similar(similar, max_outliers=max_outliers, rule=rule)


def consensus_from_similar(similar: torch.Tensor, *, max_outliers: int = 2,
                           rule: dict | None = None) -> ConsensusCategories:
    """Observation 3 from judgements already made: ``similar`` bool [n−1, C] (model m similar to the reference on
    channel c, e.g. beyond the null of :mod:`.null`; an undefined judgement passed as False). Categories as in
    :func:`consensus_categories`; ``rule`` is recorded as is."""
    similar = torch.as_tensor(similar, dtype=torch.bool)
    if similar.ndim != 2 or similar.shape[0] < 1:
        raise MergescopeError(f"similar must be [n-1, C] with n-1 >= 1; got {tuple(similar.shape)}")
    models = similar.shape[0]
    s = similar.sum(0)
    code = {name: i for i, name in enumerate(CONSENSUS_CATEGORIES)}
    cat = torch.full_like(s, code["few similar"])
    cat = torch.where((models - s <= max_outliers) & (s >= 1), code["most similar"], cat)
    cat = torch.where(s == models, code["all similar"], cat)
    cat = torch.where(s == 0, code["all dissimilar"], cat)
    return ConsensusCategories(cat.long(), s.long(), models, {"max_outliers": max_outliers, **(rule or {})})


@dataclass(frozen=True)
class Spread:
    """Mean and standard deviation of a metric across the n−1 aligned models, per channel (float64 [C])."""

    mean: torch.Tensor
    std: torch.Tensor  # population std (ddof 0) unless asked otherwise
    count: torch.Tensor  # int64 [C]: defined values that went in; mean/std are 0.0 where count is 0


def metric_spread(values: torch.Tensor, defined: torch.Tensor | None = None, *, ddof: int = 0) -> Spread:
    """Mean and std of a per-channel metric across models (thesis §3.2.3: high mean + low std ⇒ similar).

    Args:
        values: [n−1, C] metric of each aligned model against the reference.
        defined: optional bool [n−1, C]; undefined entries are left out.
        ddof: 0 for the population std, 1 for the sample std (0.0 where count ≤ ddof).

    Returns:
        :class:`Spread`.
    """
    v = torch.as_tensor(values).double()
    if v.ndim != 2:
        raise MergescopeError(f"values must be [n-1, C]; got {tuple(v.shape)}")
    ok = torch.ones_like(v, dtype=torch.bool) if defined is None else torch.as_tensor(defined, dtype=torch.bool)
    ok = ok.to(v.device) & torch.isfinite(v)
    count = ok.sum(0)
    mean = torch.where(ok, v, 0.0).sum(0) / count.clamp_min(1)
    sq = torch.where(ok, (v - mean) ** 2, 0.0).sum(0)
    std = torch.where(count > ddof, sq / (count - ddof).clamp_min(1), 0.0).sqrt()
    return Spread(mean, std, count.long())
