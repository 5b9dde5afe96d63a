"""CLIP-δ: how far apart, semantically, channel j's top-k images in model A and in aligned model B are.

Definition (DESIGN "CLIP-δ(j)", thesis 000 §3.1.4, the equation "CLIP-δ_{j,c}"). With C(X, Y) the mean pairwise
cosine similarity of the image embeddings of image sets X and Y, T_A(j) the top-k images of channel j in model A
and T_B(j) those of channel j of the aligned (permuted) model B:

    δ(j) = (C(T_A(j), T_A(j)) − C(T_A(j), T_B(j))) / mean_{p≠j} C(T_A(j), T_A(p))

p over the other channels of the same layer (the thesis's (1/(N−1)) Σ_{p≠j}). Lower = more similar.

Variants (``variant=``; :data:`CLIP_DELTA_VARIANTS`):

``"thesis"`` (default)
    The formula as the thesis writes it: only the self-similarity C(T_A(j), T_A(j)) leaves out an image's pair
    with itself (it is over the k(k−1) ordered pairs of distinct images). C(T_A(j), T_B(j)) and each
    C(T_A(j), T_A(p)) average over all k·k pairs, an image in both sets included (its cosine with itself is 1).
    So a T_B(j) identical to T_A(j) (k distinct images, self-similarity S, denominator b) gives
    C(T_A, T_B) = (k + k(k−1)·S) / k² and δ = −(1 − S) / (k · b): slightly below 0, not 0.
``"distinct_images"``
    mergescope's earlier reading: *every* C is over pairs of distinct images, so an image present in both X and Y
    is not paired with itself in C(X, Y) nor in the denominator (needs ids to know which images are shared).
    Identical top-k sets then give δ = 0 exactly up to rounding. Not the thesis's formula; kept under its name.

The original paper's code (Nanfack et al. 2023) is not public, so nothing here claims to reproduce it.
Embeddings are L2-normalised here (cosine similarity), so raw or normalised ones may be passed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import MergescopeError, NumericsError

CLIP_DELTA_VARIANTS = ("thesis", "distinct_images")


@dataclass(frozen=True)
class ClipDeltaResult:
    """CLIP-δ per channel of one layer, with the three terms it is made of (all float64 [C]).

    ``defined`` is False where δ is not: a top-k set of A with fewer than 2 distinct images (no self pairs),
    no pair between T_A(j) and T_B(j), a layer with one channel (no p ≠ j), or a denominator with
    |mean_{p≠j} C(T_A(j), T_A(p))| ≤ eps. There ``delta`` is 0.0 and the terms that are missing are 0.0.
    """

    delta: torch.Tensor  # δ(j); 0.0 where not defined
    defined: torch.Tensor  # bool [C]
    self_similarity: torch.Tensor  # C(T_A(j), T_A(j)), distinct pairs
    cross_similarity: torch.Tensor  # C(T_A(j), T_B(j))
    baseline: torch.Tensor  # mean_{p≠j} C(T_A(j), T_A(p))
    variant: str = "thesis"  # one of CLIP_DELTA_VARIANTS

    def delta_or_nan(self) -> torch.Tensor:
        """float64 [C]: ``delta`` with NaN where not defined."""
        return torch.where(self.defined, self.delta, torch.full_like(self.delta, float("nan")))

    def to_dict(self) -> dict:
        """JSON-ready: per-channel lists (None where not defined) and the count of defined channels."""
        d = self.defined.tolist()
        return {"delta": [float(v) if ok else None for v, ok in zip(self.delta.tolist(), d)],
                "self_similarity": self.self_similarity.tolist(), "cross_similarity": self.cross_similarity.tolist(),
                "baseline": self.baseline.tolist(), "defined": int(self.defined.sum()), "variant": self.variant}


@dataclass(frozen=True)
class ClipDeltaPairs:
    """δ of A's channel j against B's channel p, for every (j, p): float64 / bool [C, C_B].

    Row j uses A's self-similarity and denominator of channel j and C(T_A(j), T_B(p)) as the cross term, so the
    diagonal is :func:`clip_delta` and the off-diagonal entries are δ between *unmatched* channels (the null of
    :mod:`.null`)."""

    delta: torch.Tensor
    defined: torch.Tensor
    variant: str


@dataclass(frozen=True)
class _Terms:
    self_sim: torch.Tensor  # [C]
    n_aa: torch.Tensor  # [C] distinct pairs in T_A(j)
    cross: torch.Tensor  # [C, C_B] C(T_A(j), T_B(p))
    n_ab: torch.Tensor  # [C, C_B] pairs it averaged
    baseline: torch.Tensor  # [C]
    n_other: torch.Tensor  # [C] channels p ≠ j with a pair


def clip_delta(emb_a: torch.Tensor, emb_b: torch.Tensor, *, ids_a: torch.Tensor | None = None,
               ids_b: torch.Tensor | None = None, variant: str = "thesis", eps: float = 1e-8) -> ClipDeltaResult:
    """CLIP-δ for every channel of a layer at once (formula and variants in the module docstring).

    Args:
        emb_a: [C, k, d] embeddings of T_A(j), the top-k images of channel j in model A (row i: the i-th image).
        emb_b: [C, k_b, d] embeddings of T_B(j) in the aligned model B.
        ids_a, ids_b: optional int [C, k] / [C, k_b] image ids of those rows; -1 marks padding (row ignored).
            Rows with equal ids must carry the same embedding. Without ids every row is a different image: only
            the diagonal of C(X, X) is left out (both variants then agree).
        variant: ``"thesis"`` (default) or ``"distinct_images"`` (:data:`CLIP_DELTA_VARIANTS`).
        eps: a denominator with absolute value ≤ eps makes δ(j) undefined.

    Returns:
        :class:`ClipDeltaResult` (float64, on the device of ``emb_a``).

    Raises:
        MergescopeError: inconsistent shapes, an unknown variant, or one id with two different embeddings.
        NumericsError: a non-padding embedding that is zero or not finite.

    Example:
        >>> e = torch.eye(3).expand(2, 3, 3)  # two channels with the same 3 orthogonal images
        >>> ids = torch.tensor([[0, 1, 2], [0, 1, 2]])
        >>> clip_delta(e, e, ids_a=ids, ids_b=ids).delta.tolist()  # S = 0, b = 1/3: δ = −(1 − 0)/(3 · 1/3)
        [-1.0, -1.0]
    """
    if torch.as_tensor(emb_a).shape[:1] != torch.as_tensor(emb_b).shape[:1]:
        raise MergescopeError(f"clip_delta needs emb_a [C, k, d] and emb_b [C, k_b, d] with one C; got "
                              f"{tuple(torch.as_tensor(emb_a).shape)} and {tuple(torch.as_tensor(emb_b).shape)}")
    t = _terms(emb_a, emb_b, ids_a, ids_b, variant)
    j = torch.arange(t.self_sim.shape[0], device=t.self_sim.device)
    cross, n_ab = t.cross[j, j], t.n_ab[j, j]
    delta, defined = _ratio(t.self_sim, cross, n_ab, t, eps)
    return ClipDeltaResult(delta, defined, t.self_sim, cross, t.baseline, variant)


def clip_delta_pairs(emb_a: torch.Tensor, emb_b: torch.Tensor, *, ids_a: torch.Tensor | None = None,
                     ids_b: torch.Tensor | None = None, variant: str = "thesis", eps: float = 1e-8) -> ClipDeltaPairs:
    """δ of A's channel j against *every* channel p of B (arguments as :func:`clip_delta`; ``emb_b`` may have
    another channel count C_B). ``delta[j, j]`` equals ``clip_delta(...).delta[j]``."""
    t = _terms(emb_a, emb_b, ids_a, ids_b, variant)
    delta, defined = _ratio(t.self_sim[:, None], t.cross, t.n_ab, t, eps, pairs=True)
    return ClipDeltaPairs(delta, defined, variant)


def _ratio(self_sim, cross, n_ab, t: _Terms, eps: float, pairs: bool = False):
    """(self − cross) / baseline with its definedness; broadcast over the columns p when ``pairs``."""
    base, n_aa, n_other = (v[:, None] if pairs else v for v in (t.baseline, t.n_aa, t.n_other))
    defined = (n_aa > 0) & (n_ab > 0) & (n_other > 0) & (base.abs() > eps)
    safe = torch.where(defined, base, torch.ones_like(base)).expand_as(defined)
    return torch.where(defined, (self_sim - cross) / safe, torch.zeros_like(safe)), defined


def _terms(emb_a, emb_b, ids_a, ids_b, variant: str) -> _Terms:
    """The three terms of δ for every channel j of A and every channel p of B."""
    if variant not in CLIP_DELTA_VARIANTS:
        raise MergescopeError(f"CLIP-δ variant must be one of {', '.join(CLIP_DELTA_VARIANTS)}, got {variant!r}")
    emb_a, emb_b = torch.as_tensor(emb_a), torch.as_tensor(emb_b)
    if emb_a.ndim != 3 or emb_b.ndim != 3 or emb_a.shape[2] != emb_b.shape[2]:
        raise MergescopeError(f"clip_delta needs emb_a [C, k, d] and emb_b [C, k_b, d]; got {tuple(emb_a.shape)} "
                              f"and {tuple(emb_b.shape)}")
    device = emb_a.device
    if (ids_a is None) != (ids_b is None):
        raise MergescopeError("clip_delta: pass both ids_a and ids_b, or neither")
    channels, k, _ = emb_a.shape
    if ids_a is None:
        valid_a = torch.ones(channels, k, dtype=torch.bool, device=device)
        valid_b = torch.ones(emb_b.shape[:2], dtype=torch.bool, device=device)
    else:
        ids_a, ids_b = _ids(ids_a, emb_a, "ids_a"), _ids(ids_b, emb_b, "ids_b").to(device)
        valid_a, valid_b = ids_a >= 0, ids_b >= 0
    a = _unit_rows(emb_a.to(device, torch.float64), valid_a, "emb_a")  # [C,k,d], padding rows 0
    b = _unit_rows(emb_b.to(device, torch.float64), valid_b.to(emb_b.device), "emb_b").to(device)  # [C_B,k_b,d]
    if ids_a is not None:
        _check_same_id_same_embedding(torch.cat([ids_a.reshape(-1), ids_b.reshape(-1)])[:, None],
                                      torch.cat([a.reshape(-1, a.shape[2]), b.reshape(-1, b.shape[2])])[:, None])

    # C(T_A(j), T_A(j)): ordered pairs of distinct images i ≠ i' (and distinct ids), in every variant
    pair_aa = valid_a[:, :, None] & valid_a[:, None, :] & ~torch.eye(k, dtype=torch.bool, device=device)
    if ids_a is not None:
        pair_aa &= ids_a[:, :, None] != ids_a[:, None, :]
    self_sim, n_aa = _masked_mean(a @ a.transpose(1, 2), pair_aa)  # [C]

    # all-pairs sums from set sums: Σ_{x∈X, y∈Y} x·y = s_X·s_Y
    sa, sb = a.sum(1), b.sum(1)  # [C,d], [C_B,d]
    na, nb = valid_a.sum(1).double(), valid_b.sum(1).double()
    cross_dot, cross_n = sa @ sb.T, na[:, None] * nb[None, :]  # [C,C_B]
    base_dot, base_n = sa @ sa.T, na[:, None] * na[None, :]  # [C,C]
    if variant == "distinct_images" and ids_a is not None:
        # pairs of one image (equal ids, equal unit embeddings) contribute exactly 1 each: take them out
        shared_ab, shared_aa = _shared_id_pairs(ids_a, ids_b), _shared_id_pairs(ids_a)
        cross_dot, cross_n = cross_dot - shared_ab, cross_n - shared_ab
        base_dot, base_n = base_dot - shared_aa, base_n - shared_aa
    cross = torch.where(cross_n > 0, cross_dot / cross_n.clamp_min(1), torch.zeros_like(cross_dot))
    others = (base_n > 0) & ~torch.eye(channels, dtype=torch.bool, device=device)
    c_jp = torch.where(others, base_dot / base_n.clamp_min(1), torch.zeros_like(base_dot))
    n_other = others.sum(1)
    baseline = c_jp.sum(1) / n_other.clamp_min(1)
    return _Terms(self_sim, n_aa, cross, cross_n, baseline, n_other)


def lookup_embeddings(embed: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
                      *ids: torch.Tensor) -> list[torch.Tensor]:
    """Embeddings [*ids.shape, d] for each int id tensor (zeros at padding -1), each distinct id looked up once.

    ``embed``: a table [N, d] with the embedding of image id i in row i, or a function int64 ids [m] -> [m, d]
    (e.g. ``lambda ids: cache.get(ids, dataset)`` with an :class:`~mergescope.embed.EmbeddingCache`)."""
    ids = [torch.as_tensor(i).long() for i in ids]
    flat = torch.cat([i.reshape(-1) for i in ids])
    uniq, inverse = torch.unique(flat[flat >= 0], return_inverse=True)
    table = torch.as_tensor(embed[uniq.to(embed.device)] if isinstance(embed, torch.Tensor) else embed(uniq))
    if table.ndim != 2 or table.shape[0] != uniq.numel():
        raise MergescopeError(f"the embedding lookup returned shape {tuple(table.shape)} for {uniq.numel()} ids; "
                              "expected [ids, d]")
    rows = torch.zeros(flat.numel(), table.shape[1], dtype=table.dtype, device=table.device)
    rows[(flat >= 0).to(table.device)] = table[inverse.to(table.device)]
    out, start = [], 0
    for i in ids:
        out.append(rows[start:start + i.numel()].reshape(*i.shape, -1))
        start += i.numel()
    return out


def clip_delta_from_ids(ids_a: torch.Tensor, ids_b: torch.Tensor,
                        embed: torch.Tensor | Callable[[torch.Tensor], torch.Tensor], *,
                        variant: str = "thesis", eps: float = 1e-8) -> ClipDeltaResult:
    """CLIP-δ from top-k image ids and an embedding lookup; each distinct id is looked up once.

    Args:
        ids_a, ids_b: int [C, k] top-k image ids of channel j in model A and in aligned model B
            (``LayerProbe.topk_ids``); -1 = padding.
        embed: a table [N, d] or a function ids -> embeddings (see :func:`lookup_embeddings`).
        variant, eps: see :func:`clip_delta`.

    Returns:
        :class:`ClipDeltaResult`, as :func:`clip_delta` with these ids.
    """
    ids_a, ids_b = _id_pair(ids_a, ids_b, same_channels=True)
    emb_a, emb_b = lookup_embeddings(embed, ids_a, ids_b)
    return clip_delta(emb_a, emb_b, ids_a=ids_a, ids_b=ids_b, variant=variant, eps=eps)


def clip_delta_pairs_from_ids(ids_a: torch.Tensor, ids_b: torch.Tensor,
                              embed: torch.Tensor | Callable[[torch.Tensor], torch.Tensor], *,
                              variant: str = "thesis", eps: float = 1e-8) -> ClipDeltaPairs:
    """:func:`clip_delta_pairs` from top-k image ids and an embedding lookup (as :func:`clip_delta_from_ids`)."""
    ids_a, ids_b = _id_pair(ids_a, ids_b, same_channels=False)
    emb_a, emb_b = lookup_embeddings(embed, ids_a, ids_b)
    return clip_delta_pairs(emb_a, emb_b, ids_a=ids_a, ids_b=ids_b, variant=variant, eps=eps)


def _id_pair(ids_a, ids_b, same_channels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids_a, ids_b = torch.as_tensor(ids_a).long(), torch.as_tensor(ids_b).long()
    if ids_a.ndim != 2 or ids_b.ndim != 2 or (same_channels and ids_a.shape[0] != ids_b.shape[0]):
        raise MergescopeError(f"ids_a and ids_b must be [C, k]{' with the same C' if same_channels else ''}; got "
                              f"{tuple(ids_a.shape)} and {tuple(ids_b.shape)}")
    return ids_a, ids_b


def _ids(ids, emb: torch.Tensor, name: str) -> torch.Tensor:
    ids = torch.as_tensor(ids, device=emb.device)
    if ids.shape != emb.shape[:2] or ids.is_floating_point():
        raise MergescopeError(f"{name} must be integer ids of shape {tuple(emb.shape[:2])}; got {ids.dtype} "
                              f"{tuple(ids.shape)}")
    return ids.long()


def _unit_rows(e: torch.Tensor, valid: torch.Tensor, name: str) -> torch.Tensor:
    """L2-normalised rows; padding rows set to 0; a valid zero or non-finite row is an error."""
    norm = e.norm(dim=-1, keepdim=True)  # [C,k,1]
    bad = valid & ~(torch.isfinite(norm[..., 0]) & (norm[..., 0] > 0))
    if bad.any():
        c, i = bad.nonzero()[0].tolist()
        raise NumericsError(f"{name}[{c}, {i}] is zero or not finite; cosine similarity needs a direction")
    return torch.where(valid[..., None], e / torch.where(valid[..., None], norm, torch.ones_like(norm)),
                       torch.zeros_like(e))


def _masked_mean(sim: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``sim`` [C,p,q] over ``mask`` per channel (0 where empty), and the pair counts [C]."""
    count = mask.sum((1, 2))
    return (sim * mask).sum((1, 2)) / count.clamp_min(1), count


def _shared_id_pairs(ids: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [C, C']: number of (x in row j of ``ids``, y in row p of ``other``, default ``ids``) with the
    same valid id."""
    other = ids if other is None else other.to(ids.device)
    both = torch.cat([ids.reshape(-1), other.reshape(-1)])
    uniq = torch.unique(both[both >= 0])

    def incidence(t: torch.Tensor) -> torch.Tensor:  # [rows, U]
        valid = t >= 0
        inc = torch.zeros(t.shape[0], uniq.numel(), dtype=torch.float32, device=t.device)
        rows = torch.arange(t.shape[0], device=t.device)[:, None].expand_as(t)[valid]
        inc.index_put_((rows, torch.searchsorted(uniq, t[valid])), torch.ones_like(rows, dtype=torch.float32),
                       accumulate=True)
        return inc

    return (incidence(ids) @ incidence(other).T).double()  # counts ≤ k², exact in float32


def _check_same_id_same_embedding(ids: torch.Tensor, unit: torch.Tensor, tol: float = 1e-6) -> None:
    valid = ids >= 0
    flat_ids, flat = ids[valid], unit[valid]  # [m], [m,d]
    uniq, inverse = torch.unique(flat_ids, return_inverse=True)
    first = torch.zeros(uniq.numel(), flat.shape[1], dtype=flat.dtype, device=flat.device)
    first[inverse] = flat  # one representative per id (any)
    worst = (flat - first[inverse]).abs().amax(1) if flat.numel() else flat.new_zeros(0)
    if worst.numel() and worst.max() > tol:
        bad = int(flat_ids[worst.argmax()])
        raise MergescopeError(f"image id {bad} comes with two different embeddings; embed each id once "
                              "(e.g. with mergescope.embed.EmbeddingCache)")
