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
the moved channels only (a term with several moved neighbours is recomputed as one difference). The moved
channels of all of a group's terms go into one in-place product per weight layout (``addmm_``); each weight is
kept in a layout whose rows or columns are the other axis's channels (:func:`_layout`: the weight's own memory
except for wide kernels' input axes), so gathering ``S`` is one ``index_select``. Terms no other group touches
(BatchNorm vectors, a classifier's input) are summed once. Later sweeps move few channels, so they cost little; a
group none of whose neighbours moved since its last solve is skipped (same cost, same optimum), so the final,
no-change sweep costs nothing. Scipy gets each cost as the float64 minimization it solves without a copy, with
column potentials that shorten its search (:func:`_lap_cost`; same optimum). The returned cost matrices are
those of the returned permutations, also when ``max_iter`` stops the descent early. With :data:`INCREMENTAL`
false every cost is recomputed from scratch (the literal algorithm; the tests compare the two).
"""
from __future__ import annotations

import math
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


def _split(t: torch.Tensor, ax: PermAxis, o_ax: PermAxis) -> tuple[torch.Tensor, int, int]:
    """``t`` viewed with both channel axes split into (channels, block); the positions of the two channel dims."""
    shape: list[int] = []
    for i, n in enumerate(t.shape):
        block = ax.block if i == ax.axis else o_ax.block if i == o_ax.axis else None
        shape += [n] if block is None else [n // block, block]
    return t.reshape(shape), ax.axis + (o_ax.axis < ax.axis), o_ax.axis + (ax.axis < o_ax.axis)


def _layout(t: torch.Tensor, ax: PermAxis, o_ax: PermAxis) -> tuple[torch.Tensor, bool]:
    """The weight of a term with one other permuted axis ``o_ax``, laid out for gathering ``o_ax``'s channels.

    Other-first (``True``) when ``o_ax`` is the weight's first axis and ``ax`` is not (the input axis of a conv or
    linear layer): (C_o, rest, C_ax), gathered by rows — the weight's own memory for a linear layer or 1×1 conv, a
    copy for wider kernels. Otherwise channels-first (``False``): (C_ax, C_o, rest) or (C_ax, before, C_o, rest)
    — the weight's own memory when ``ax`` is its first axis (a conv's output axis). Either way the entries of a
    channel come in :func:`_flat`'s order. Returns the contiguous tensor and the flag. (Three or four dimensions,
    not the split view's size-1 ones: those send ``index_select`` down a path ~10x slower.)
    """
    v, ax_dim, o_dim = _split(t, ax, o_ax)
    first = v.movedim(ax_dim, 0)
    if first.is_contiguous() or o_ax.axis != 0:
        first = first.contiguous()
        o_dim += o_dim < ax_dim
        before = math.prod(first.shape[1:o_dim])
        grouped = [first.shape[0]] + ([before] if before > 1 else []) + [first.shape[o_dim], -1]
        return first.view(grouped), False
    other = v.movedim(ax_dim, -1).contiguous()  # o_ax's channels already lead
    return other.view(other.shape[0], -1, other.shape[-1]), True


def _pick(t: torch.Tensor, rows: bool, idx: torch.Tensor | None) -> torch.Tensor:
    """The channels ``idx`` (None: all, in order) of a :func:`_layout` weight as a matrix: (K, C_ax) other-first,
    (C_ax, K) channels-first, the K entries of the kept channels in :func:`_flat`'s order."""
    if rows:
        return (t if idx is None else t.index_select(0, idx)).view(-1, t.shape[-1])
    return (t if idx is None else t.index_select(t.dim() - 2, idx)).view(len(t), -1)


_ROWS = 64  # rows per block of the column potentials in :func:`_lap_cost`


def _lap_cost(c: torch.Tensor, out: np.ndarray | None = None) -> np.ndarray:
    """``w_j - c_ij``, float64 in C order: the cost scipy minimizes, uncopied, for ``max_p sum_i c[i, p[i]]``.

    ``w_j = max_i (c_ij - max_k c_ik)`` are the column potentials of the Hungarian method's initial reduction
    (Munkres 1957: subtract each row's best, then each column's best); a constant per column changes every
    permutation's sum by the same amount, so the optimum is that of ``c``. Scipy's shortest augmenting paths
    start from zero duals; from these they take ~30% less time on ResNet50's costs (measured; the row part of
    the reduction makes no difference). ``w_j - c_ij`` of two float32 numbers is exact in float64 (magnitudes
    within 2^29).
    ``out``: a (C, C) float64 array to write into (reused across solves: no fresh pages per call).
    """
    x = c.cpu().numpy()  # (C, C) float32, shares c's memory on the CPU
    r = x.max(1, keepdims=True)  # (C, 1)
    w = np.full(x.shape[1], -np.inf, np.float32)  # (C,)
    block = np.empty((min(_ROWS, len(x)), x.shape[1]), np.float32)  # rows at a time: stays in cache
    for i in range(0, len(x), _ROWS):
        part = np.subtract(x[i:i + _ROWS], r[i:i + _ROWS], out=block[: len(x) - i])
        np.maximum(w, part.max(0), out=w)
    return np.subtract(w, x, out=out, dtype=np.float64)


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

    laid: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, bool]] = {}

    def layout(ax: PermAxis, o_ax: PermAxis) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """A's and B's weight of ``ax`` as :func:`_layout` lays them out for the one other axis ``o_ax``."""
        key = (ax.param, ax.axis)
        if key not in laid:
            (a_l, rows), (b_l, _) = _layout(a[ax.param], ax, o_ax), _layout(b_0[ax.param], ax, o_ax)
            laid[key] = a_l, b_l, rows
        return laid[key]

    def product(ax: PermAxis, others, at: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, R)``, ``L @ R = A_ax @ B_axᵀ`` with B's other axes permuted by ``at`` and ``ax`` in B's own order."""
        if len(others) == 1:
            (o, o_ax), = others
            a_l, b_l, rows = layout(ax, o_ax)
            x, y = _pick(a_l, rows, None), _pick(b_l, rows, at[o])
            return (x.T, y) if rows else (x, y.T)
        b = b_0[ax.param]
        for o, o_ax in others:
            b = _gather(b, o_ax, at[o])
        return _flat(a[ax.param], ax), _flat(b, ax).T

    def term(ax: PermAxis, others, at: Mapping[str, torch.Tensor]) -> torch.Tensor:
        left, right = product(ax, others, at)
        return left @ right

    def fresh(g: str) -> torch.Tensor:
        total = None
        for ax, others in terms[g]:
            left, right = product(ax, others, perms)
            total = left @ right if total is None else total.addmm_(left, right)
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
        parts: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}  # per layout: A_S, B_new,S − B_old,S
        for ax, others in terms[g]:
            hit = [(o, o_ax) for o, o_ax in others if o in moved]
            if not hit:
                continue
            if len(others) == 1:  # the products of the moved channels only
                (o, o_ax), = hit
                s, old, new = moved[o], then[o], perms[o]
                a_l, b_l, rows = layout(ax, o_ax)
                a_s, d_s = parts[rows]
                a_s.append(_pick(a_l, rows, None if len(s) == len(new) else s))  # every channel moved: all of A
                d_s.append(_pick(b_l, rows, new[s]) - _pick(b_l, rows, old[s]))
            else:
                c += term(ax, others, perms) - term(ax, others, then)
        for rows, (a_s, d_s) in parts.items():  # one product per layout: c += [A_S1 | A_S2 | …] [D_1 | D_2 | …]ᵀ
            if a_s:
                k_dim = 0 if rows else 1
                x, d = (a_s[0], d_s[0]) if len(a_s) == 1 else (torch.cat(a_s, k_dim), torch.cat(d_s, k_dim))
                c.addmm_(x.T, d) if rows else c.addmm_(x, d.T)
        seen[g] = {o: perms[o] for o in neighbours[g]}
        return c

    lap_bufs: dict[int, np.ndarray] = {}  # scipy's input, one per group size
    rng = np.random.default_rng(seed)
    names = list(spec.groups)
    for _ in range(max_iter):
        improved = False
        for gi in rng.permutation(len(names)):
            g = names[gi]
            if g in seen and all(seen[g][o] is perms[o] for o in neighbours[g]):
                continue  # nothing it depends on moved since its last solve: the same cost, the same optimum
            c = cost(g)
            if len(c) not in lap_bufs:
                lap_bufs[len(c)] = np.empty(c.shape, np.float64)
            buf = lap_bufs[len(c)]
            new = best_permutation(_lap_cost(c, buf), f"weight-matching cost ({g})", maximize=False).to(device)
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
