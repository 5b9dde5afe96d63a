"""ZipIt! (Stoica et al. 2024): merge features by correlation, also within one model, with merge/unmerge matrices.

Per group, the features of A and B are concatenated ([a; b], 2C channels) and their Pearson correlation is taken
over images × positions at the group's observation points (:class:`JointMoments`). Greedily, the most correlated
pair of (current) features is merged into one, until C remain:

* a pair may come from the same model (a within-model merge); each model has a budget of ``int(b·C/2)`` such
  merges (the "β" same-model budget, Sec. 4.3). As in the reference, the budget is checked *after* each
  within-model merge: once a model's budget is ≤ 0, pairs of two of its (current) features are blocked. So every
  model gets at least one within-model merge, also at ``b = 0``;
* the merged feature's similarity with every other feature becomes the minimum of the two merged features'
  (current) similarities, times ``a`` (the "α" penalty on merging a feature again; penalties compound), so
  features can gather more than two members. ``a ≤ 0`` (the reference's special case) keeps the minimum
  unpenalized but blocks the merged feature's pairs with every feature of the models it came from: after an
  A–B merge it is never merged again, after an A–A merge it can still join one of B's features.

This is the paper's greedy matching (Sec. 4.3; authors' code: gstoica27/ZipIt ``match_tensors_zipit``) with that
code's defaults a = 0.3, b = 0.125; a merged feature's model of origin is that of its lowest-index member. Two
deviations, both outside the reference's well-defined cases: the reference's ``a ≤ 0`` rule blocks index ranges
of the original layout in a matrix that shrinks as features merge (so the ranges drift after the first merge);
here it blocks by each feature's model of origin. And when every remaining pair is blocked (the reference would
then merge a feature with itself), the most correlated remaining pair by raw correlation is merged.
Result: unmerge U (2C × C, U[f, c] = 1 if feature f belongs to merged
feature c) and merge M (C × 2C, the members' weighted mean: weight α for A's features, 1−α for B's, normalized
per merged feature; α = 0.5 is the reference's plain mean). The merged model is θ = α·T_A(θ_A) + (1−α)·T_B(θ_B) with forward_A = M[:, :C]/α,
inverse_A = U[:C] (and the same for B), i.e. every layer computes M·[y_A; y_B] from features unmerged by U.
Merged features keep the order of their lowest member (A's order where A's feature is a member), so for a
permuted copy (every feature paired with its twin) the merge is permutation merging, exactly.

The full zip returns a model of the original width and architecture. Partial zipping (``up_to=layer``: zip up to
a layer, then run both models' remaining layers and blend their outputs) needs extra layers — two heads — and
returns a multi-head model (:mod:`mergescope.merge.partial_zip`). REPAIR of a zip targets the zipped endpoints'
features (:func:`mergescope.merge.repair.repair_many` with the zip's maps). What the method guarantees (exact for
permuted copies, two models, maps that depend on the merge weights) is its registry entry, ``zipit``
(:mod:`mergescope.merge.methods`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..align.covariance import JointMoments, group_covariances
from ..perm import PermSpec, build_spec
from .maps import ChannelMap, MapLayout, MapMergeResult, map_layout, merge_models_with_maps
from .partial_zip import partial_zip_model


def zip_features(stats: JointMoments, alpha: float = 0.5, a: float = 0.3, b: float = 0.125
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ZipIt! merge M (C × 2C) and unmerge U (2C × C) matrices of one group (C = A's width).

    Args:
        stats: joint statistics with a = A's features, b = B's.
        alpha: the weight of A's features in the merged mean (0 < alpha < 1).
        a: penalty factor on a merged feature's similarities (≤ 0: never again with its own models' features).
        b: within-model merge budget per model, as a fraction of C/2 (checked after each within-model merge).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"ZipIt! needs 0 < alpha < 1, got {alpha}")
    corr = stats.correlation(constants_match=True)  # (D, D); constant channels pair with each other
    ca, d = stats.size_a, len(corr)
    origin = torch.cat([torch.zeros(ca, dtype=torch.long), torch.ones(d - ca, dtype=torch.long)]).to(corr.device)
    neg = -torch.inf
    sims = corr.clone()
    sims.fill_diagonal_(neg)
    budget = [int(((d - ca) // 2) * b + 1e-4)] * 2  # C merges to make, shared equally by the two models
    active = torch.ones(d, dtype=torch.bool, device=corr.device)
    members: list[list[int]] = [[i] for i in range(d)]
    while int(active.sum()) > ca:
        flat = int(sims.argmax())
        i, j = divmod(flat, d)
        if sims[i, j] == neg:  # every allowed pair is blocked: fall back to the raw correlation of active ones
            fallback = torch.where(active.unsqueeze(1) & active.unsqueeze(0), corr, torch.full_like(corr, neg))
            fallback.fill_diagonal_(neg)
            i, j = divmod(int(fallback.argmax()), d)
        i, j = min(i, j), max(i, j)
        members[i] += members[j]
        new = torch.minimum(sims[i], sims[j])
        if a > 0:
            new = new * a
        else:  # never again with a feature of the models it came from
            new[(origin == origin[i]) | (origin == origin[j])] = neg
        sims[i, :], sims[:, i] = new, new
        sims[j, :], sims[:, j] = neg, neg
        sims[i, i] = neg
        active[j] = False
        if origin[i] == origin[j]:
            o = int(origin[i])
            budget[o] -= 1
            if budget[o] <= 0:
                same = (origin == o) & active
                sims[same.unsqueeze(1) & same.unsqueeze(0)] = neg
    kept = active.nonzero().flatten().tolist()  # merged features in the order of their lowest member
    unmerge = torch.zeros(d, len(kept), dtype=torch.float64, device=corr.device)
    merge = torch.zeros(len(kept), d, dtype=torch.float64, device=corr.device)
    for c, i in enumerate(kept):
        idx = torch.as_tensor(members[i], device=corr.device)
        unmerge[idx, c] = 1.0
        w = torch.where(origin[idx] == 0, alpha, 1.0 - alpha).double()
        merge[c, idx] = w / w.sum()
    return merge, unmerge


def zipit_maps(stats: Mapping[str, JointMoments], alpha: float = 0.5, a: float = 0.3, b: float = 0.125
               ) -> tuple[dict[str, ChannelMap], dict[str, ChannelMap], dict]:
    """Per group, the maps of A and of B into the zipped space, and {group: (merge, unmerge)}."""
    maps_a, maps_b, mats = {}, {}, {}
    for g, st in stats.items():
        m, u = zip_features(st, alpha, a, b)
        ca = st.size_a
        maps_a[g] = ChannelMap(m[:, :ca] / alpha, u[:ca].contiguous())
        maps_b[g] = ChannelMap(m[:, ca:] / (1 - alpha), u[ca:].contiguous())
        mats[g] = (m, u)
    return maps_a, maps_b, mats


def zipit_merge(
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable,
    spec: PermSpec | None = None,
    alpha: float = 0.5,
    a: float = 0.3,
    b: float = 0.125,
    layout: MapLayout | None = None,
    stats: Mapping[str, JointMoments] | None = None,
    device: torch.device | str = "cpu",
    up_to: str | None = None,
) -> MapMergeResult:
    """Zip two models into one of the original architecture (or, with ``up_to``, partially: a multi-head model).

    Args:
        model_a, model_b: two models of one architecture.
        batches: data for the feature correlations (one pass; unused when ``stats`` is given).
        alpha: weight of A's features (0.5: the paper's merge).
        a, b: ZipIt!'s α (repeat-merge penalty) and β (within-model budget), see :func:`zip_features`.
        stats: precomputed ``group_covariances(model_a, [model_b], …)[0]``.
        up_to: zip up to this layer (a name of ``spec.layers``) and run A's and B's own layers after it
            (:func:`mergescope.merge.partial_zip.partial_zip_model`); None: the full zip.

    Returns:
        :class:`MapMergeResult`; extras {"merge_unmerge": {group: (M, U)}, "within": {group: (A-A, B-B merges)}}.

    Example:
        >>> res = zipit_merge(model_a, model_b, iter_batches(train, 500))
        >>> repair_and_reset(model_a, model_b, spec, iter_batches(train, 500), reset=[res.model])
    """
    spec = spec or build_spec(model_a)
    layout = layout or map_layout(model_a, spec)
    if stats is None:
        [stats] = group_covariances(model_a, [model_b], spec, batches, device=device)
    maps_a, maps_b, mats = zipit_maps(stats, alpha, a, b)
    weights = [alpha, 1.0 - alpha]
    model = merge_models_with_maps([model_a, model_b], weights, [maps_a, maps_b], layout)
    within = {}
    for g, (_, u) in mats.items():
        ca = stats[g].size_a
        from_a, from_b = u[:ca].sum(0), u[ca:].sum(0)  # members per merged feature from each model
        within[g] = (int((from_a >= 2).sum()), int((from_b >= 2).sum()))
    if up_to is not None:
        model = partial_zip_model(model, model_a, model_b, (maps_a, maps_b), spec, up_to, alpha)
    return MapMergeResult(model, [maps_a, maps_b], weights, {"merge_unmerge": mats, "within": within})
