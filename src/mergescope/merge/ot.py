"""OT fusion (Singh & Jaggi 2020), activation-based: soft transport maps between the channels of two models.

Per group, the cost of moving B's channel j onto A's channel i is computed from the joint feature statistics
(images × positions at the group's observation points):

* ``"correlation"``: 1 − Pearson correlation (scale-free, what activation matching maximizes); two constant
  channels (never firing on the data) cost 0, a constant and a varying one 1;
* ``"sqeuclidean"``: the mean squared difference E[(a_i − b_j)²] (Singh & Jaggi's ground metric on activations).

The cost is divided by its mean, so ``reg`` is relative. With uniform marginals, entropic OT is solved by
log-domain Sinkhorn with ε-scaling (stable and fast for small ``reg``); ``reg = 0`` solves the exact problem, which for equal widths is a
permutation (an optimal vertex: ``linear_sum_assignment``). The plan Π (rows and columns sum to 1/C) gives the
barycentric maps used as T: forward = Π / row sums (each A channel a weighted average of B channels, rows sum to
1), inverse = Πᵀ / column sums — OT fusion's own rule for the next layer's input (not a pseudo-inverse). As
``reg`` → 0 the plan tends to the permutation and the merge to permutation merging.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..align.covariance import JointMoments
from ..errors import NumericsError
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
    name="ot",
    needs_extra_layers=False,
    exact_for_permuted_copies=True,
    notes="reg = 0 gives a permutation (exact permutation merging); reg > 0 gives averaging maps, an "
          "approximation after each ReLU (exact at pre-activations); BatchNorm refolded (see merge.maps). "
          "Equal widths only with reg = 0; reg > 0 handles unequal widths.",
)


def sinkhorn(cost: torch.Tensor, reg: float, max_iter: int = 5000, tol: float = 1e-10) -> tuple[torch.Tensor, bool]:
    """Entropic OT with uniform marginals: log-domain Sinkhorn with ε-scaling.

    ε starts at the cost's range and is halved down to ``reg``, each stage warm-starting the dual potentials
    (plain Sinkhorn needs O(1/ε) iterations at small ε).

    Args:
        cost: (n, m) cost matrix.
        reg: entropic regularization ε > 0 (in the cost's units).
        max_iter: iteration cap of the last stage (earlier stages: a tenth each).
        tol: stop a stage when the row marginals are within ``tol`` (L1) of uniform.

    Returns:
        (plan (n, m) float64 with columns summing to 1/m and rows to 1/n within ``tol``, converged).
    """
    c = cost.double()
    n, m = c.shape
    log_a = torch.full((n,), -math.log(n), dtype=c.dtype, device=c.device)
    log_b = torch.full((m,), -math.log(m), dtype=c.dtype, device=c.device)
    f = torch.zeros(n, dtype=c.dtype, device=c.device)
    g = torch.zeros(m, dtype=c.dtype, device=c.device)
    span = float(c.max() - c.min())
    eps_stages = []
    eps = max(span, reg)
    while eps > reg:
        eps_stages.append(eps)
        eps /= 2
    eps_stages.append(reg)

    def log_plan(eps):
        return (f.unsqueeze(1) + g.unsqueeze(0) - c) / eps

    converged = False
    for stage, eps in enumerate(eps_stages):
        last = stage == len(eps_stages) - 1
        converged = False
        for _ in range(max_iter if last else max(1, max_iter // 10)):
            f = eps * log_a - eps * torch.logsumexp((g.unsqueeze(0) - c) / eps, dim=1)
            g = eps * log_b - eps * torch.logsumexp((f.unsqueeze(1) - c) / eps, dim=0)
            if (log_plan(eps).exp().sum(1) - log_a.exp()).abs().sum() < tol:
                converged = True
                break
    return log_plan(reg).exp(), converged


def activation_cost(stats: JointMoments, cost: str = "correlation") -> torch.Tensor:
    """(C_A, C_B) transport cost between A's and B's channels from the joint statistics."""
    ca = stats.size_a
    if cost == "correlation":
        return 1.0 - stats.correlation(constants_match=True)[:ca, ca:]
    if cost == "sqeuclidean":
        n = max(stats.n, 1)
        var_a, var_b = stats.saa.diagonal() / n, stats.sbb.diagonal() / n
        dmean = stats.mean_a.unsqueeze(1) - stats.mean_b.unsqueeze(0)
        return (var_a.unsqueeze(1) + var_b.unsqueeze(0) - 2 * stats.sab / n + dmean**2).clamp_min(0)
    raise ValueError(f"cost must be 'correlation' or 'sqeuclidean', got {cost!r}")


def ot_map(stats: JointMoments, reg: float = 0.01, cost: str = "correlation",
           max_iter: int = 5000) -> tuple[ChannelMap, torch.Tensor]:
    """The OT map of B's channels into A's space for one group, and the transport plan.

    Args:
        stats: joint statistics with a = A's features, b = B's.
        reg: relative entropic regularization (ε = reg · mean cost); 0: exact OT (a permutation).
        cost: "correlation" or "sqeuclidean" (see the module docstring).
    """
    c = activation_cost(stats, cost)
    c = c / c.mean().clamp_min(1e-12)
    if not torch.isfinite(c).all():
        raise NumericsError("OT cost matrix contains NaN or Inf")
    n, m = c.shape
    if reg <= 0:
        if n != m:
            raise ValueError("exact OT (reg = 0) needs equal widths")
        rows, cols = linear_sum_assignment(c.cpu().numpy())
        plan = torch.zeros(n, m, dtype=torch.float64, device=c.device)
        plan[torch.as_tensor(rows), torch.as_tensor(cols)] = 1.0 / n
    else:
        plan, _ = sinkhorn(c, reg, max_iter)
    forward = plan / plan.sum(1, keepdim=True).clamp_min(1e-300)
    inverse = (plan / plan.sum(0, keepdim=True).clamp_min(1e-300)).T.contiguous()
    if reg <= 0:
        forward, inverse = forward.round(), inverse.round()  # exact 0/1: applied as a permutation
    return ChannelMap(forward, inverse), plan


def ot_maps(stats: Mapping[str, JointMoments], reg: float = 0.01, cost: str = "correlation"
            ) -> tuple[dict[str, ChannelMap], dict[str, torch.Tensor]]:
    """:func:`ot_map` for every group; returns (maps, {group: plan})."""
    return per_group(lambda st: ot_map(st, reg, cost), stats)


def ot_merge_many(
    reference: nn.Module,
    others: Sequence[nn.Module],
    batches: Iterable,
    spec: PermSpec | None = None,
    weights: Sequence[float] | None = None,
    reg: float = 0.01,
    cost: str = "correlation",
    layout: MapLayout | None = None,
    stats: Sequence[Mapping[str, JointMoments]] | None = None,
    device: torch.device | str = "cpu",
) -> MapMergeResult:
    """Transport every model of ``others`` onto the reference's channels and average all of them.

    Args: as :func:`mergescope.merge.cca.cca_merge_many`, with ``reg`` and ``cost`` of :func:`ot_map`.

    Returns:
        :class:`MapMergeResult` with extras {"plans": [per model {group: plan}]}.
    """
    return merge_many_by_stats(reference, others, batches, lambda st: ot_maps(st, reg, cost), INFO, "plans", spec,
                               weights, layout, stats, device)
