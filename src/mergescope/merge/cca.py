"""CCA merging (Horoi et al. 2024, "Harmony in Diversity: Merging Neural Networks with Canonical Correlation
Analysis"): align linear combinations of features, not units.

Per group, with Σ_AA, Σ_BB, Σ_AB the population (co)variances of A's and B's features (centred; images ×
positions at the group's observation points — post-activation, as the reference's graphs hook them — from
:class:`JointMoments`) and the regularised covariances S_A = Σ_AA + γ·I, S_B = Σ_BB + γ·I, CCA whitens both sides
and takes the SVD of the whitened cross-covariance (CCA's standard solution, as the paper):

    S_A^{-1/2} Σ_AB S_B^{-1/2} = U diag(ρ) Vᵀ,    P_A = S_A^{-1/2} U,  P_B = S_B^{-1/2} V,

ρ the canonical correlations. B is mapped into A's space by identifying the canonical variates
(P_Aᵀ a ≈ P_Bᵀ b) and undoing A's projection:

    T = P_A^{-T} P_Bᵀ = S_A^{1/2} U Vᵀ S_B^{-1/2},    T⁻¹ = S_B^{1/2} V Uᵀ S_A^{-1/2}.

**Default (``cca``): the reference's regularisation** (shoroi/align-n-merge ``match_tensors_cca``): γ = 0.1
added to the covariance itself (absolute, in the features' units; 0.1 is the function's default, and the
reference's hyper-parameter search tries 1e-6…1e7 per setting). **Variant ``cca_relative``** (mergescope's earlier
default): γ = λ·(mean variance of that side), so λ = 0.1 is scale-free. For a permuted copy (b = P a) T = Pᵀ exactly,
either way. Means are not mapped (REPAIR/RESET restore them).

One guard the reference lacks: constant channels (ReLU units that never fire on the data) have no canonical
directions — the SVD would pair them arbitrarily, with signs, waking them up — so CCA runs on the non-constant
channels and constant ones get zero rows/columns in T (identical to the reference when no channel is constant).

Many models: each is mapped into the reference's space with its own T and all are averaged, as in the paper's
multi-model setting (the registry's ``cca``: :func:`mergescope.merge.methods.get_merge_method`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..align.covariance import JointMoments
from .maps import ChannelMap, per_group


def _sym_power(s: torch.Tensor, p: float) -> torch.Tensor:
    """S^p for a symmetric positive definite S."""
    e, v = torch.linalg.eigh(s)
    return (v * e.clamp_min(1e-300).pow(p).unsqueeze(0)) @ v.T


def cca_map(stats: JointMoments, ridge: float = 0.1, relative: bool = False) -> tuple[ChannelMap, torch.Tensor]:
    """The CCA map of B's channels into A's space for one group, and the canonical correlations (descending).

    Args:
        stats: joint statistics with a = A's features, b = B's.
        ridge: γ > 0 added to both covariances' diagonals (the reference: 0.1).
        relative: γ·(mean variance of each side) instead of γ (the ``cca_relative`` variant).
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
    scale_a = saa.diagonal().mean().clamp_min(1e-300) if relative else 1.0
    scale_b = sbb.diagonal().mean().clamp_min(1e-300) if relative else 1.0
    sa, sb = saa + ridge * scale_a * eye_a, sbb + ridge * scale_b * eye_b
    sa_half, sa_ihalf = _sym_power(sa, 0.5), _sym_power(sa, -0.5)
    sb_half, sb_ihalf = _sym_power(sb, 0.5), _sym_power(sb, -0.5)
    u, rho, vh = torch.linalg.svd(sa_ihalf @ sab @ sb_ihalf, full_matrices=False)
    rot = u @ vh  # (C_A, C_B), the orthogonal factor
    forward = torch.zeros(full, dtype=cov.dtype, device=cov.device)
    inverse = torch.zeros(full[::-1], dtype=cov.dtype, device=cov.device)
    forward[la.unsqueeze(1), lb.unsqueeze(0)] = sa_half @ rot @ sb_ihalf
    inverse[lb.unsqueeze(1), la.unsqueeze(0)] = sb_half @ rot.T @ sa_ihalf
    return ChannelMap(forward, inverse), rho


def cca_maps(stats: Mapping[str, JointMoments], ridge: float = 0.1, relative: bool = False
             ) -> tuple[dict[str, ChannelMap], dict]:
    """:func:`cca_map` for every group; returns (maps, {group: canonical correlations})."""
    return per_group(lambda st: cca_map(st, ridge, relative), stats)
