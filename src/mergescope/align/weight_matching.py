"""Weight matching (Ainsworth et al. 2023, Git Re-Basin, Algorithm 1): coordinate descent over the groups.

Algorithm 1 (PermutationCoordinateDescent): start from the identity; in each sweep visit every group once, in a
random order, and with every other permutation held fixed replace the group's permutation by the solution of the
linear assignment problem ``max_p sum_i C[i, p[i]]``, ``C = sum over the group's weight axes of A_axis @ P(B)_axisᵀ``
(each weight viewed with that axis first and the rest flattened; for an MLP layer ℓ: ``W_ℓ^A P_{ℓ-1} W_ℓ^Bᵀ +
W_{ℓ+1}^Aᵀ P_{ℓ+1} W_{ℓ+1}^B`` plus the bias terms); sweeps repeat until one changes no permutation (a new
solution is adopted only when it raises the group's objective by more than 1e-6 relative). The order of sweep k
is the k-th ``permutation`` drawn from ``numpy.random.default_rng(seed)`` over the groups in spec order, as the
reference (samuela/git-re-basin ``weight_matching``) draws a fresh random order per iteration. The cost covers
every weight axis the spec moves, BatchNorm running statistics included; the reference's networks (JAX: batch
statistics are not parameters; its ResNets use LayerNorm) have none, so it says nothing about them.

Speed: each group's cost matrix is kept (columns in B's original channel order) and brought up to date by
adding only what changed since its last solve. Every term is linear in B permuted on the term's other axes, so
when a neighbour ``o`` moved the channels ``S`` the term changes by ``A_S (B_new,S − B_old,S)ᵀ`` — the products of
the moved channels only (a term with several moved neighbours is recomputed as one difference). Terms no other
group touches (BatchNorm vectors, a classifier's input) are summed once. Later sweeps move few channels, so they
cost little; a group none of whose neighbours moved since its last solve is skipped (same cost, same optimum), so
the final, no-change sweep costs nothing. The returned cost matrices are those of the returned permutations, also
when ``max_iter`` stops the descent early. With :data:`INCREMENTAL` false every cost is recomputed from scratch
(the literal algorithm; the tests compare the two).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..errors import ArchitectureError
from ..perm import PermSpec
from ..perm.spec import PermAxis
from ._assignment import best_permutation
from .result import MatchResult


def _flat(t: torch.Tensor, ax: PermAxis) -> torch.Tensor:
    """View ``t`` with the permuted channel axis first: (C, everything else)."""
    shape = t.shape
    if ax.block > 1:
        t = t.reshape(*shape[: ax.axis], -1, ax.block, *shape[ax.axis + 1:])
    return t.movedim(ax.axis, 0).reshape(t.shape[ax.axis], -1)


INCREMENTAL = True  # False: every cost matrix recomputed from scratch at every solve


def _others(spec: PermSpec, ax: PermAxis) -> tuple[tuple[str, PermAxis], ...]:
    """The groups on the other axes of ``ax.param`` with their axes: the term of ``ax`` changes only when they move."""
    return tuple((g, _axis_of(spec, g, ax.param, i)) for i, g in enumerate(spec.param_axes[ax.param])
                 if i != ax.axis and g is not None)


def _axis_of(spec: PermSpec, group: str, param: str, axis: int) -> PermAxis:
    return next(ax for ax in spec.groups[group].axes if ax.param == param and ax.axis == axis)


def _gather(t: torch.Tensor, ax: PermAxis, idx: torch.Tensor) -> torch.Tensor:
    """The channels ``idx`` of axis ``ax`` of ``t`` (each with its ``ax.block`` features)."""
    shape = t.shape
    blocked = t.reshape(*shape[: ax.axis], -1, ax.block, *shape[ax.axis + 1:])
    return blocked.index_select(ax.axis, idx).reshape(*shape[: ax.axis], -1, *shape[ax.axis + 1:])


def weight_matching(
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    spec: PermSpec,
    max_iter: int = 100,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> MatchResult:
    """Permute ``state_b`` onto ``state_a`` by maximizing the inner product of their weights.

    Args:
        state_a, state_b: state dicts of two models with the architecture of ``spec``.
        spec: the permutation spec (:func:`mergescope.perm.build_spec`).
        max_iter: maximum number of sweeps over all groups.
        seed: seed of the random group order.

    Returns:
        :class:`MatchResult` with ``similarity[g]`` the cost matrix of group ``g`` (A channel × B channel) under
        the returned permutations of the other groups.

    Example:
        >>> res = weight_matching(model_a.state_dict(), model_b.state_dict(), spec)
        >>> aligned_b = permute_model(model_b, spec, res.perms)
    """
    keys = list(spec.param_axes)
    for k in keys:
        if k not in state_a or k not in state_b or state_a[k].shape != state_b[k].shape:
            raise ArchitectureError(f"weight '{k}' is missing or differs in shape between the two models")
    a = {k: state_a[k].detach().to(device, torch.float32) for k in keys}
    b_0 = {k: state_b[k].detach().to(device, torch.float32) for k in keys}  # B as given
    perms = {g: torch.arange(grp.size, device=device) for g, grp in spec.groups.items()}
    terms = {g: [(ax, _others(spec, ax)) for ax in grp.axes] for g, grp in spec.groups.items()}
    neighbours = {g: tuple(dict.fromkeys(o for _, others in terms[g] for o, _ in others)) for g in spec.groups}

    def term(ax: PermAxis, others, at: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``A_ax @ B_axᵀ`` with B's other axes permuted by ``at`` and ``ax`` itself in B's original order."""
        b = b_0[ax.param]
        for o, o_ax in others:
            b = _gather(b, o_ax, at[o])
        return _flat(a[ax.param], ax) @ _flat(b, ax).T

    def fresh(g: str) -> torch.Tensor:
        total = None
        for ax, others in terms[g]:
            t = term(ax, others, perms)
            total = t if total is None else total.add_(t)
        return total

    costs: dict[str, torch.Tensor] = {}  # a group's cost matrix as of seen[g]
    seen: dict[str, dict[str, torch.Tensor]] = {}  # the neighbours' permutations costs[g] is up to date with
    #                                                (in the descent: those it was last solved with)

    def cost(g: str) -> torch.Tensor:
        """C[i, j] = <A channel i, B channel j> with every other permutation applied."""
        if not INCREMENTAL or g not in costs:
            costs[g], seen[g] = fresh(g), {o: perms[o] for o in neighbours[g]}
            return costs[g]
        c, then = costs[g], seen[g]
        moved = {o: (then[o] != perms[o]).nonzero().flatten() for o in neighbours[g] if then[o] is not perms[o]}
        moved = {o: m for o, m in moved.items() if len(m)}
        for ax, others in terms[g]:
            hit = [(o, o_ax) for o, o_ax in others if o in moved]
            if not hit:
                continue
            if len(others) == 1:  # the products of the moved channels only
                (o, o_ax), = hit
                s, old, new = moved[o], then[o], perms[o]
                a_s = _flat(_gather(a[ax.param], o_ax, s), ax)
                diff = _gather(b_0[ax.param], o_ax, new[s]) - _gather(b_0[ax.param], o_ax, old[s])
                c += a_s @ _flat(diff, ax).T
            else:
                c += term(ax, others, perms) - term(ax, others, then)
        seen[g] = {o: perms[o] for o in neighbours[g]}
        return c

    rng = np.random.default_rng(seed)
    names = list(spec.groups)
    for _ in range(max_iter):
        improved = False
        for gi in rng.permutation(len(names)):
            g = names[gi]
            if g in seen and all(seen[g][o] is perms[o] for o in neighbours[g]):
                continue  # nothing it depends on moved since its last solve: the same cost, the same optimum
            c = cost(g)
            new = best_permutation(c, f"weight-matching cost ({g})").to(device)
            rows = torch.arange(len(new), device=device)
            old_score, new_score = c[rows, perms[g]].sum().item(), c[rows, new].sum().item()
            if new_score > old_score + 1e-6 * max(abs(old_score), 1.0):
                perms[g] = new  # a new tensor: ``is`` tells a moved group from an unmoved one
                improved = True
        if not improved:
            break
    # A group solved before a neighbour moved holds a stale cost when max_iter ends the descent: bring it up to date.
    sims = {g: cost(g).double().cpu().numpy() for g in names}
    return MatchResult({g: p.cpu() for g, p in perms.items()}, sims, "weight")


def weight_objective(state_a: Mapping[str, torch.Tensor], state_b_permuted: Mapping[str, torch.Tensor],
                     spec: PermSpec) -> float:
    """Git Re-Basin's objective: the summed inner product of all permutable weights of A and P(B)."""
    return float(sum((state_a[k].double() * state_b_permuted[k].double()).sum() for k in spec.param_axes))
