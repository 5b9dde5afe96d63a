"""CCA merging (Horoi et al. 2024, "Harmony in Diversity"): align linear combinations of features, not units.

Per group, with regularized covariances S_A = Σ_AA + λ·s_A·I, S_B = Σ_BB + λ·s_B·I (s = mean variance, so λ is
relative) and the cross-covariance Σ_AB of A's and B's features (images × positions at the group's observation
points, from :class:`JointMoments`), CCA whitens both sides and takes the SVD of the whitened cross-covariance,
S_A^{-1/2} Σ_AB S_B^{-1/2} = U diag(ρ) Vᵀ; the canonical directions are P_A = S_A^{-1/2} U, P_B = S_B^{-1/2} V
and ρ the canonical correlations. B is mapped into A's space by identifying the canonical variates
(P_Aᵀ a ≈ P_Bᵀ b) and undoing A's projection:

    T = P_A^{-T} P_Bᵀ = S_A^{1/2} U Vᵀ S_B^{-1/2},    T⁻¹ = S_B^{1/2} V Uᵀ S_A^{-1/2}

(the transform of the authors' public code, with our relative ridge). For a permuted copy (b = P a) T = Pᵀ
exactly, for any λ. Means are not mapped (REPAIR/RESET restore them). Constant channels (ReLU units that never
fire on the data) have no canonical directions — CCA would rotate them arbitrarily among themselves, with
signs, waking them up — so CCA runs on the non-constant channels and constant ones get zero rows/columns in T.

Many models: each is mapped into the reference's space with its own T and all are averaged
(:func:`cca_merge_many`), as in the paper's multi-model setting.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..align.covariance import JointMoments
from ..perm import PermSpec
from .maps import (
    ChannelMap,
    MapLayout,
    MapMergeResult,
    MethodInfo,
    merge_many_by_stats,
    per_group,
)

INFO = MethodInfo(
    name="cca",
    needs_extra_layers=False,
    exact_for_permuted_copies=True,
    notes="Maps are general invertible matrices: after each ReLU the mapped B only approximates B "
          "(exact at pre-activations); BatchNorm is refolded (see merge.maps). Many models: all mapped into the "
          "reference's space and averaged.",
)


def _sym_power(s: torch.Tensor, p: float) -> torch.Tensor:
    """S^p for a symmetric positive definite S."""
    e, v = torch.linalg.eigh(s)
    return (v * e.clamp_min(1e-300).pow(p).unsqueeze(0)) @ v.T


def cca_map(stats: JointMoments, ridge: float = 0.1) -> tuple[ChannelMap, torch.Tensor]:
    """The CCA map of B's channels into A's space for one group, and the canonical correlations (descending).

    Args:
        stats: joint statistics with a = A's features, b = B's.
        ridge: relative ridge λ > 0 added to both covariances (λ·mean variance); constant channels need it.
    """
    ca = stats.size_a
    live = ~stats.constant()
    la, lb = live[:ca].nonzero().flatten(), live[ca:].nonzero().flatten()
    cov = stats.covariance()
    full = (ca, len(cov) - ca)
    cov = cov[:, live][live]  # constant channels have no canonical directions: their rows/columns stay 0
    ca = len(la)
    saa, sbb, sab = cov[:ca, :ca], cov[ca:, ca:], cov[:ca, ca:]
    if ridge <= 0 and (torch.linalg.eigvalsh(saa).min() <= 0 or torch.linalg.eigvalsh(sbb).min() <= 0):
        raise ValueError("CCA needs ridge > 0 when a covariance is singular (constant or collinear channels)")
    eye_a = torch.eye(ca, dtype=cov.dtype, device=cov.device)
    eye_b = torch.eye(len(sbb), dtype=cov.dtype, device=cov.device)
    sa = saa + ridge * saa.diagonal().mean().clamp_min(1e-300) * eye_a
    sb = sbb + ridge * sbb.diagonal().mean().clamp_min(1e-300) * eye_b
    sa_half, sa_ihalf = _sym_power(sa, 0.5), _sym_power(sa, -0.5)
    sb_half, sb_ihalf = _sym_power(sb, 0.5), _sym_power(sb, -0.5)
    u, rho, vh = torch.linalg.svd(sa_ihalf @ sab @ sb_ihalf, full_matrices=False)
    rot = u @ vh  # (C_A, C_B), the orthogonal factor
    forward = torch.zeros(full, dtype=cov.dtype, device=cov.device)
    inverse = torch.zeros(full[::-1], dtype=cov.dtype, device=cov.device)
    forward[la.unsqueeze(1), lb.unsqueeze(0)] = sa_half @ rot @ sb_ihalf
    inverse[lb.unsqueeze(1), la.unsqueeze(0)] = sb_half @ rot.T @ sa_ihalf
    return ChannelMap(forward, inverse), rho


def cca_maps(stats: Mapping[str, JointMoments], ridge: float = 0.1) -> tuple[dict[str, ChannelMap], dict]:
    """:func:`cca_map` for every group; returns (maps, {group: canonical correlations})."""
    return per_group(lambda st: cca_map(st, ridge), stats)


def cca_merge_many(
    reference: nn.Module,
    others: Sequence[nn.Module],
    batches: Iterable,
    spec: PermSpec | None = None,
    weights: Sequence[float] | None = None,
    ridge: float = 0.1,
    layout: MapLayout | None = None,
    stats: Sequence[Mapping[str, JointMoments]] | None = None,
    device: torch.device | str = "cpu",
) -> MapMergeResult:
    """Map every model of ``others`` into the reference's space by CCA and average all of them.

    Args:
        reference: the model whose channel space is kept.
        others: models of the same architecture.
        batches: data for the feature statistics (one pass; unused when ``stats`` is given).
        weights: averaging weights, reference first (default uniform; for two models, (α, 1−α)).
        ridge: relative ridge of the CCA.
        stats: precomputed :func:`group_covariances` (one dict per model of ``others``).

    Returns:
        :class:`MapMergeResult` with extras {"canonical_correlations": [per model {group: ρ}]}.

    Example:
        >>> res = cca_merge_many(model_a, [model_b], iter_batches(train, 500))
        >>> res.model            # the merged model, original architecture
    """
    return merge_many_by_stats(reference, others, batches, lambda st: cca_maps(st, ridge), INFO, "canonical_correlations", spec,
                               weights, layout, stats, device)
