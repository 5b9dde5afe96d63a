"""CLIP-δ: how far apart, semantically, channel j's top-k images in model A and in aligned model B are.

Definition (DESIGN "CLIP-δ(j)", thesis 000 §3.1.4). With C(X, Y) the mean pairwise cosine similarity of the image
embeddings of image sets X and Y, T_A(j) the top-k images of channel j in model A and T_B(j) those of channel j
of the aligned (permuted) model B:

    δ(j) = (C(T_A(j), T_A(j)) − C(T_A(j), T_B(j))) / mean_{p≠j} C(T_A(j), T_A(p))

p over the other channels of the same layer. Lower = more similar; identical top-k sets give 0. Pairs are pairs
of *distinct* images: C(X, X) is over distinct pairs only (as DESIGN states), and, so that one rule covers every
C, an image that lies in both X and Y is not paired with itself in C(X, Y) either (when ids are known). That is
what makes δ = 0 for T_B(j) = T_A(j): the second term is then C(X, X). This is the thesis's formula as written
there; the original paper's code (Nanfack et al. 2023) is not public, so nothing here claims to reproduce it.

Embeddings are L2-normalised here (cosine similarity), so raw or normalised ones may be passed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import MergescopeError, NumericsError


@dataclass(frozen=True)
class ClipDeltaResult:
    """CLIP-δ per channel of one layer, with the three terms it is made of (all float64 [C]).

    ``defined`` is False where δ is not: a top-k set of A with fewer than 2 distinct images (no self pairs),
    no pair between T_A(j) and T_B(j), a layer with one channel (no p ≠ j), or a denominator with
    |mean_{p≠j} C(T_A(j), T_A(p))| ≤ eps. There ``delta`` is 0.0 and the terms that are missing are 0.0.
    """

    delta: torch.Tensor  # δ(j); 0.0 where not defined
    defined: torch.Tensor  # bool [C]
    self_similarity: torch.Tensor  # C(T_A(j), T_A(j))
    cross_similarity: torch.Tensor  # C(T_A(j), T_B(j))
    baseline: torch.Tensor  # mean_{p≠j} C(T_A(j), T_A(p))

    def delta_or_nan(self) -> torch.Tensor:
        """float64 [C]: ``delta`` with NaN where not defined."""
        return torch.where(self.defined, self.delta, torch.full_like(self.delta, float("nan")))

    def to_dict(self) -> dict:
        """JSON-ready: per-channel lists (None where not defined) and the count of defined channels."""
        d = self.defined.tolist()
        return {"delta": [float(v) if ok else None for v, ok in zip(self.delta.tolist(), d)],
                "self_similarity": self.self_similarity.tolist(), "cross_similarity": self.cross_similarity.tolist(),
                "baseline": self.baseline.tolist(), "defined": int(self.defined.sum())}


def clip_delta(emb_a: torch.Tensor, emb_b: torch.Tensor, *, ids_a: torch.Tensor | None = None,
               ids_b: torch.Tensor | None = None, eps: float = 1e-8) -> ClipDeltaResult:
    """CLIP-δ for every channel of a layer at once (formula in the module docstring).

    Args:
        emb_a: [C, k, d] embeddings of T_A(j), the top-k images of channel j in model A (row i: the i-th image).
        emb_b: [C, k_b, d] embeddings of T_B(j) in the aligned model B.
        ids_a, ids_b: optional int [C, k] / [C, k_b] image ids of those rows; -1 marks padding (row ignored).
            With ids, pairs of an image with itself (equal ids) are left out of every C, and rows with equal ids
            must carry the same embedding. Without ids every row is a different image (only the diagonal of
            C(X, X) is left out), so identical sets do *not* give δ = 0: pass ids whenever sets can share images.
        eps: a denominator with absolute value ≤ eps makes δ(j) undefined.

    Returns:
        :class:`ClipDeltaResult` (float64, on the device of ``emb_a``).

    Raises:
        MergescopeError: inconsistent shapes, or one id with two different embeddings.
        NumericsError: a non-padding embedding that is zero or not finite.

    Example:
        >>> e = torch.eye(3).expand(2, 3, 3)  # two channels with the same 3 orthogonal images
        >>> ids = torch.tensor([[0, 1, 2], [0, 1, 2]])
        >>> clip_delta(e, e, ids_a=ids, ids_b=ids).defined.tolist()  # denominator 0: undefined
        [False, False]
    """
    emb_a, emb_b = torch.as_tensor(emb_a), torch.as_tensor(emb_b)
    if emb_a.ndim != 3 or emb_b.ndim != 3 or emb_a.shape[0] != emb_b.shape[0] or emb_a.shape[2] != emb_b.shape[2]:
        raise MergescopeError(f"clip_delta needs emb_a [C, k, d] and emb_b [C, k_b, d]; got {tuple(emb_a.shape)} "
                              f"and {tuple(emb_b.shape)}")
    device = emb_a.device
    if (ids_a is None) != (ids_b is None):
        raise MergescopeError("clip_delta: pass both ids_a and ids_b, or neither")
    channels, k, _ = emb_a.shape
    if ids_a is None:
        valid_a = torch.ones(channels, k, dtype=torch.bool, device=device)
        valid_b = torch.ones(channels, emb_b.shape[1], dtype=torch.bool, device=device)
    else:
        ids_a, ids_b = _ids(ids_a, emb_a, "ids_a"), _ids(ids_b, emb_b, "ids_b")
        valid_a, valid_b = ids_a >= 0, ids_b >= 0
    a = _unit_rows(emb_a.to(device, torch.float64), valid_a, "emb_a")  # [C,k,d], padding rows 0
    b = _unit_rows(emb_b.to(device, torch.float64), valid_b, "emb_b")  # [C,k_b,d]
    if ids_a is not None:
        _check_same_id_same_embedding(torch.cat([ids_a, ids_b], 1), torch.cat([a, b], 1))

    # C(T_A(j), T_A(j)): distinct pairs i ≠ i' (and distinct ids)
    pair_aa = valid_a[:, :, None] & valid_a[:, None, :] & ~torch.eye(k, dtype=torch.bool, device=device)
    if ids_a is not None:
        pair_aa &= ids_a[:, :, None] != ids_a[:, None, :]
    self_sim, n_aa = _masked_mean(a @ a.transpose(1, 2), pair_aa)  # [C]

    # C(T_A(j), T_B(j)): all pairs of distinct images
    pair_ab = valid_a[:, :, None] & valid_b[:, None, :]
    if ids_a is not None:
        pair_ab &= ids_a[:, :, None] != ids_b[:, None, :]
    cross_sim, n_ab = _masked_mean(a @ b.transpose(1, 2), pair_ab)

    # C(T_A(j), T_A(p)) for all p from set sums: Σ_{x∈X, y∈Y} a_x·a_y = s_X·s_Y; pairs of one image (equal ids,
    # equal unit embeddings) contribute exactly 1 each and are subtracted.
    sums = a.sum(1)  # [C,d]
    dot = sums @ sums.T  # [C,C]
    sizes = valid_a.sum(1).double()  # [C]
    pairs = sizes[:, None] * sizes[None, :]
    if ids_a is not None:
        same = _shared_id_pairs(ids_a)  # [C,C]
        dot, pairs = dot - same, pairs - same
    others = (pairs > 0) & ~torch.eye(channels, dtype=torch.bool, device=device)
    c_jp = torch.where(others, dot / pairs.clamp_min(1), torch.zeros_like(dot))
    n_other = others.sum(1)
    baseline = c_jp.sum(1) / n_other.clamp_min(1)

    defined = (n_aa > 0) & (n_ab > 0) & (n_other > 0) & (baseline.abs() > eps)
    delta = torch.where(defined, (self_sim - cross_sim) / torch.where(defined, baseline, torch.ones_like(baseline)),
                        torch.zeros_like(baseline))
    return ClipDeltaResult(delta, defined, self_sim, cross_sim, baseline)


def clip_delta_from_ids(ids_a: torch.Tensor, ids_b: torch.Tensor,
                        embed: torch.Tensor | Callable[[torch.Tensor], torch.Tensor], *,
                        eps: float = 1e-8) -> ClipDeltaResult:
    """CLIP-δ from top-k image ids and an embedding lookup; each distinct id is looked up once.

    Args:
        ids_a, ids_b: int [C, k] top-k image ids of channel j in model A and in aligned model B
            (``LayerProbe.topk_ids``); -1 = padding.
        embed: a table [N, d] with the embedding of image id i in row i, or a function mapping int64 ids [m] to
            embeddings [m, d], e.g. ``lambda ids: cache.get(ids, dataset)`` with an
            :class:`~mergescope.embed.EmbeddingCache`.
        eps: see :func:`clip_delta`.

    Returns:
        :class:`ClipDeltaResult`, as :func:`clip_delta` with these ids.
    """
    ids_a, ids_b = torch.as_tensor(ids_a).long(), torch.as_tensor(ids_b).long()
    if ids_a.ndim != 2 or ids_b.ndim != 2 or ids_a.shape[0] != ids_b.shape[0]:
        raise MergescopeError(f"ids_a and ids_b must be [C, k] with the same C; got {tuple(ids_a.shape)} and "
                              f"{tuple(ids_b.shape)}")
    both = torch.cat([ids_a.reshape(-1), ids_b.reshape(-1)])
    uniq, inverse = torch.unique(both[both >= 0], return_inverse=True)
    table = embed[uniq.to(embed.device)] if isinstance(embed, torch.Tensor) else embed(uniq)
    table = torch.as_tensor(table)
    if table.ndim != 2 or table.shape[0] != uniq.numel():
        raise MergescopeError(f"the embedding lookup returned shape {tuple(table.shape)} for {uniq.numel()} ids; "
                              "expected [ids, d]")
    rows = torch.zeros(both.numel(), table.shape[1], dtype=table.dtype, device=table.device)
    rows[(both >= 0).to(table.device)] = table[inverse.to(table.device)]
    emb_a, emb_b = rows[: ids_a.numel()], rows[ids_a.numel():]
    return clip_delta(emb_a.reshape(*ids_a.shape, -1), emb_b.reshape(*ids_b.shape, -1),
                      ids_a=ids_a, ids_b=ids_b, eps=eps)


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


def _shared_id_pairs(ids: torch.Tensor) -> torch.Tensor:
    """float64 [C,C]: number of (x in row j, y in row p) with the same valid id."""
    channels = ids.shape[0]
    valid = ids >= 0
    uniq, inverse = torch.unique(ids[valid], return_inverse=True)
    incidence = torch.zeros(channels, uniq.numel(), dtype=torch.float32, device=ids.device)  # [C,U]
    rows = torch.arange(channels, device=ids.device)[:, None].expand_as(ids)[valid]
    incidence.index_put_((rows, inverse), torch.ones_like(rows, dtype=torch.float32), accumulate=True)
    return (incidence @ incidence.T).double()  # counts ≤ k², exact in float32


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
