"""OT fusion (Singh & Jaggi 2020, "Model Fusion via Optimal Transport"), activation-based: transport maps between
the channels of two models.

Per group, B's channels (the source measure, uniform mass 1/C_B each) are transported onto A's (uniform, 1/C_A),
§4 of the paper: the plan Π (C_A, C_B) solves min_Π ⟨Π, M⟩ subject to Π·1 = 1/C_A, Πᵀ·1 = 1/C_B, Π ≥ 0.

**Default (``ot``: the reference's activation mode, sidak/otfusion ``--geom-ensemble-type acts --exact
--ground-metric euclidean --not-squared --ground-metric-normalize none --prelu-acts``):** the ground metric is
the (not squared) Euclidean distance between the channels' *pre-activation* vectors over the samples,
M_ij = ‖a_i − b_j‖₂ = sqrt(Σ_s (a_i(s) − b_j(s))²), s over images × positions (the reference flattens each
conv channel's map over positions and samples the same way), raw values — neither centred nor normalised. It is
computed from the joint statistics as sqrt(N·(E[a_i²] + E[b_j²] − 2 E[a_i b_j])). The gathering points are the
caller's: :func:`mergescope.align.covariance.group_covariances` with ``at="preactivation"`` (each conv/linear
output after its BatchNorm, the input of the ReLU; the reference's nets have no BatchNorm, where this is the
layer's own output). **Deviation for residual streams:** the reference (``--handle-skips``) computes one plan
per conv and averages the transport maps across each skip, which is no single map per group; here a stream gets
one plan, from its own pre-activation — the sum of the residual add before the ReLU — at the output of its
stage's last block (where REPAIR's reference matches it; the sums at every block and the stem's BatchNorm output
are pooled with ``points="all"``). On a trained digits ResNet20 pair (seeds 0, 1; 6 epochs, width 1) this gives
ot+repair 93.6% at α = 0.5, against 91.1% when the outputs of every conv writing into the stream (each block's
conv2 and shortcut, after their BatchNorms) are pooled, and 94.4% with the stage end's post-activations
(permuted+repair: 96.9%); seeds 2, 3: 94.7% vs 93.9% and 93.9% (permuted+repair 95.0%).
The problem is solved exactly (POT's ``ot.emd``, network simplex); for equal widths the optimum is a permutation.

**Variant ``ot_sinkhorn`` (mergescope's earlier default):** cost 1 − Pearson correlation on the post-activation
features (the observation points; two constant channels cost 0, a constant and a varying one 1), divided by
its mean, and entropic OT with ε = ``reg`` (so ``reg`` is relative to the mean cost), solved by POT's
log-stabilised Sinkhorn with ε-scaling. As ``reg`` → 0 the plan tends to the exact one.

**From plan to map** (the paper's §4 alignment, the plan scaled by the inverse of A's marginal β): forward =
diag(Π·1)⁻¹ Π — Π divided by its row sums, the barycentric projection of B onto A (each A channel a weighted
average of B channels, rows sum to 1) — is applied to the output axes; the input axes of the next layer get
inverse = diag(Πᵀ·1)⁻¹ Πᵀ — Πᵀ divided by B's marginal, each B channel an average of A channels. The reference
multiplies the next layer by its own normalised plan instead (divided by B's marginal with ``--correction``,
by A's with ``--proper-marginals``); with uniform marginals and equal widths — every merge of two models of
one architecture — all of these are C·Π and C·Πᵀ, and an exact plan is a permutation, applied as one.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import ot as pot
import torch

from ..align.covariance import JointMoments
from ..errors import NumericsError
from .maps import ChannelMap, per_group, permutation_index

COSTS = ("euclidean", "sqeuclidean", "correlation")


def sinkhorn(cost: torch.Tensor, reg: float, max_iter: int = 1000, tol: float = 1e-9) -> tuple[torch.Tensor, bool]:
    """Entropic OT with uniform marginals (POT's log-stabilised Sinkhorn with ε-scaling from the cost's range).

    Args:
        cost: (n, m) cost matrix.
        reg: entropic regularization ε > 0 (in the cost's units).
        max_iter: cap on POT's outer (ε-scaling) iterations.
        tol: marginal tolerance (L1) for ``converged``.

    Returns:
        (plan (n, m) float64 with rows summing to 1/n and columns to ≈ 1/m, converged: both within ``tol``).
    """
    c = cost.double().cpu().numpy()
    n, m = c.shape
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "did not converge": reported by ``converged``
        plan = pot.bregman.sinkhorn_epsilon_scaling(a, b, c, reg, numItermax=max_iter,
                                                    epsilon0=max(float(c.max() - c.min()), reg), stopThr=tol)
    converged = bool(np.abs(plan.sum(1) - a).sum() < tol and np.abs(plan.sum(0) - b).sum() < tol)
    return torch.from_numpy(plan).to(cost.device), converged


def emd(cost: torch.Tensor) -> torch.Tensor:
    """Exact OT with uniform marginals (POT's ``ot.emd``): the (n, m) float64 plan."""
    c = np.ascontiguousarray(cost.double().cpu().numpy())
    n, m = c.shape
    plan, log = pot.emd(np.full(n, 1.0 / n), np.full(m, 1.0 / m), c, numItermax=max(100_000, 50 * n * m), log=True)
    if log["result_code"] != 1:
        raise NumericsError(f"exact OT did not reach the optimum: {log['warning']}")
    return torch.from_numpy(plan).to(cost.device)


def activation_cost(stats: JointMoments, cost: str = "euclidean") -> torch.Tensor:
    """(C_A, C_B) transport cost between A's and B's channels from the joint statistics (module docstring).

    ``"euclidean"``: ‖a_i − b_j‖₂ over the N samples; ``"sqeuclidean"``: its square; ``"correlation"``:
    1 − Pearson correlation.
    """
    ca = stats.size_a
    if cost == "correlation":
        return 1.0 - stats.correlation(constants_match=True)[:ca, ca:]
    if cost in ("euclidean", "sqeuclidean"):
        n = max(stats.n, 1)
        var_a, var_b = stats.saa.diagonal() / n, stats.sbb.diagonal() / n
        dmean = stats.mean_a.unsqueeze(1) - stats.mean_b.unsqueeze(0)
        sq = n * (var_a.unsqueeze(1) + var_b.unsqueeze(0) - 2 * stats.sab / n + dmean**2).clamp_min(0)  # Σ_s (a−b)²
        return sq.sqrt() if cost == "euclidean" else sq
    raise ValueError(f"cost must be one of {', '.join(COSTS)}; got {cost!r}")


def barycentric_maps(plan: torch.Tensor) -> ChannelMap:
    """forward = Π / row sums (B onto A), inverse = Πᵀ / column sums (A onto B); a permutation stays exact."""
    n, m = plan.shape
    if n == m:
        idx = permutation_index((plan * n).round())
        if idx is not None and torch.allclose(plan * n, (plan * n).round(), atol=1e-9):
            t = torch.zeros_like(plan)
            t[torch.arange(n), idx] = 1.0  # exact 0/1: applied as a permutation
            return ChannelMap(t, t.T.contiguous())
    forward = plan / plan.sum(1, keepdim=True).clamp_min(1e-300)
    inverse = (plan / plan.sum(0, keepdim=True).clamp_min(1e-300)).T.contiguous()
    return ChannelMap(forward, inverse)


def ot_map(stats: JointMoments, reg: float = 0.0, cost: str = "euclidean",
           max_iter: int = 1000) -> tuple[ChannelMap, torch.Tensor]:
    """The OT map of B's channels into A's space for one group, and the transport plan Π (C_A, C_B).

    Args:
        stats: joint statistics with a = A's features, b = B's — at the pre-activation points for the default
            (``group_covariances(..., at="preactivation")``), at the observation points for ``ot_sinkhorn``.
        reg: 0 (default): exact OT; > 0: entropic OT with ε = reg · mean cost.
        cost: "euclidean" (default), "sqeuclidean" or "correlation" (:func:`activation_cost`).

    Example:
        >>> [pre] = group_covariances(model_a, [model_b], spec, batches, at="preactivation")
        >>> maps, plan = ot_map(pre["features.0"])                       # Singh & Jaggi's activation mode
    """
    c = activation_cost(stats, cost)
    if not torch.isfinite(c).all():
        raise NumericsError("OT cost matrix contains NaN or Inf")
    if reg < 0:
        raise ValueError(f"reg must be >= 0 (0: exact OT), got {reg}")
    plan = emd(c) if reg == 0 else sinkhorn(c / c.mean().clamp_min(1e-300), reg, max_iter)[0]
    return barycentric_maps(plan), plan


def ot_maps(stats: Mapping[str, JointMoments], reg: float = 0.0, cost: str = "euclidean"
            ) -> tuple[dict[str, ChannelMap], dict[str, torch.Tensor]]:
    """:func:`ot_map` for every group; returns (maps, {group: plan})."""
    return per_group(lambda st: ot_map(st, reg, cost), stats)
