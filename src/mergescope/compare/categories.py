"""Channel categories of the thesis's Observations 2 and 3 (000 §3.2.2, §3.2.3), by explicit, tunable rules.

Observation 2 (merged model): where aligned B does not match A on channel c, do the merged model's top-k images
come from A, from B, from both, or from neither? Observation 3 (n models aligned to one reference): is channel c
similar in all of them, in most, or in none? The thesis sorted channels by eye; these rules make the sorting
reproducible, with every threshold a parameter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MergescopeError
from .overlap import first_occurrence, member, topk_overlap

MERGED_CATEGORIES = ("matched", "A", "B", "mixed", "neither")
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
        counts = {name: int((self.category == i).sum()) for i, name in enumerate(MERGED_CATEGORIES)}
        unmatched = len(self.category) - counts["matched"]
        return {"channels": len(self.category), "matched": counts["matched"], "unmatched": unmatched,
                **{f"n_{n}": counts[n] for n in MERGED_CATEGORIES[1:]},
                **{f"share_{n}": (counts[n] / unmatched if unmatched else None) for n in MERGED_CATEGORIES[1:]}}


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
    models = sim.shape[0]
    s = similar.sum(0)
    code = {name: i for i, name in enumerate(CONSENSUS_CATEGORIES)}
    cat = torch.full_like(s, code["few similar"])
    cat = torch.where((models - s <= max_outliers) & (s >= 1), code["most similar"], cat)
    cat = torch.where(s == models, code["all similar"], cat)
    cat = torch.where(s == 0, code["all dissimilar"], cat)
    rule = {"threshold": threshold, "higher_is_similar": higher_is_similar, "max_outliers": max_outliers}
    return ConsensusCategories(cat.long(), s.long(), models, rule)


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
