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

Speed: ``P(B)`` is kept fully permuted and only the weights a changed group touches are re-indexed; each weight
axis's term of the cost is cached (columns in B's original channel order) and brought up to date only
when a permutation on another axis of that weight moved: a term with one such axis is updated by the products of
the channels that moved only, ``A_S (B_new,S − B_old,S)ᵀ`` (the term is linear in B), while fewer than
:data:`INCREMENTAL` of them moved — later sweeps move few channels — and recomputed otherwise; a group none of
whose neighbours moved since its last solve is skipped (same cost, same optimum), so the final, no-change sweep
costs nothing. The returned cost matrices are rebuilt from the cache at exit (only stale terms are recomputed):
they are those of the returned permutations, also when ``max_iter`` stops the descent early.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..errors import ArchitectureError
from ..perm import PermSpec, invert, permute_axis
from ..perm.spec import PermAxis
from ._assignment import best_permutation
from .result import MatchResult


def _flat(t: torch.Tensor, ax: PermAxis) -> torch.Tensor:
    """View ``t`` with the permuted channel axis first: (C, everything else)."""
    shape = t.shape
    if ax.block > 1:
        t = t.reshape(*shape[: ax.axis], -1, ax.block, *shape[ax.axis + 1:])
    return t.movedim(ax.axis, 0).reshape(t.shape[ax.axis], -1)


INCREMENTAL = 0.5  # a term is updated from the moved channels while fewer than this fraction of them moved


def _others(spec: PermSpec, ax: PermAxis) -> tuple[str, ...]:
    """The groups on the other axes of ``ax.param``: the cost term of ``ax`` changes only when they move."""
    return tuple(g for i, g in enumerate(spec.param_axes[ax.param]) if i != ax.axis and g is not None)


def _axis_of(spec: PermSpec, group: str, param: str) -> PermAxis:
    return next(ax for ax in spec.groups[group].axes if ax.param == param)


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
    b_cur = dict(b_0)  # B with all current perms applied
    perms = {g: torch.arange(grp.size, device=device) for g, grp in spec.groups.items()}
    history = {g: [p] for g, p in perms.items()}  # history[g][v]: g's permutation at version v
    terms = {g: [(ax, _others(spec, ax)) for ax in grp.axes] for g, grp in spec.groups.items()}
    a_flat = {(ax.param, ax.axis): _flat(a[ax.param], ax) for grp in spec.groups.values() for ax in grp.axes}
    term_cache: dict[tuple[str, int], tuple[tuple[int, ...], torch.Tensor]] = {}
    solved: dict[str, tuple[int, ...]] = {}  # versions of a group's neighbours when its cost was last solved

    def version(g: str) -> int:
        return len(history[g]) - 1

    def update(ax: PermAxis, other: str, since: int, c: torch.Tensor) -> bool:
        """Bring the term ``c`` of ``ax`` up to date with ``other``'s moves since version ``since`` (in place),
        from the moved channels only; False (``c`` untouched) where recomputing it costs less."""
        o_ax = _axis_of(spec, other, ax.param)
        old, new = history[other][since], perms[other]
        moved = (old != new).nonzero().flatten()
        if len(moved) >= INCREMENTAL * len(new):
            return False
        if len(moved):
            a_s = _flat(_gather(a[ax.param], o_ax, moved), ax)
            diff = _gather(b_0[ax.param], o_ax, new[moved]) - _gather(b_0[ax.param], o_ax, old[moved])
            c += a_s @ _flat(diff, ax).T
        return True

    def cost(g: str) -> torch.Tensor:
        """C[i, j] = <A channel i, B channel j> with every other permutation applied; cached per weight axis."""
        total = None
        for ax, others in terms[g]:
            key, stamp = (ax.param, ax.axis), tuple(version(o) for o in others)
            hit = term_cache.get(key)
            if hit is None or hit[0] != stamp:
                if hit is not None and len(others) == 1 and update(ax, others[0], hit[0][0], hit[1]):
                    hit = term_cache[key] = (stamp, hit[1])
                else:
                    m = a_flat[key] @ _flat(b_cur[ax.param], ax).T  # (C, C); column j' is B channel perms[g][j']
                    c = torch.empty_like(m)
                    c[:, perms[g]] = m
                    hit = term_cache[key] = (stamp, c)
            total = hit[1].clone() if total is None else total.add_(hit[1])
        return total

    rng = np.random.default_rng(seed)
    names = list(spec.groups)
    for _ in range(max_iter):
        improved = False
        for gi in rng.permutation(len(names)):
            g = names[gi]
            stamp = tuple(version(o) for _, others in terms[g] for o in others)
            if solved.get(g) == stamp:
                continue  # nothing it depends on moved: the same cost, the same optimum
            c = cost(g)
            solved[g] = stamp
            new = best_permutation(c, f"weight-matching cost ({g})").to(device)
            rows = torch.arange(len(new), device=device)
            old_score, new_score = c[rows, perms[g]].sum().item(), c[rows, new].sum().item()
            if new_score > old_score + 1e-6 * max(abs(old_score), 1.0):
                step = invert(perms[g])[new]
                for ax in spec.groups[g].axes:
                    b_cur[ax.param] = permute_axis(b_cur[ax.param], ax, step)
                perms[g] = new
                history[g].append(new)
                improved = True
        if not improved:
            break
    # A group solved before a neighbour moved holds a stale cost when max_iter ends the descent: refresh at exit.
    sims = {g: cost(g).double().cpu().numpy() for g in names}
    return MatchResult({g: p.cpu() for g, p in perms.items()}, sims, "weight")


def weight_objective(state_a: Mapping[str, torch.Tensor], state_b_permuted: Mapping[str, torch.Tensor],
                     spec: PermSpec) -> float:
    """Git Re-Basin's objective: the summed inner product of all permutable weights of A and P(B)."""
    return float(sum((state_a[k].double() * state_b_permuted[k].double()).sum() for k in spec.param_axes))
