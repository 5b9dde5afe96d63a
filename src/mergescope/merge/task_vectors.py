"""Task vectors over a shared base model: task arithmetic, TIES-merging, DARE and Model Breadcrumbs.

A task vector is τ_k = θ_k − θ_base (Ilharco et al. 2023), per parameter tensor (``{name: tensor}``, float64).
Each method turns the models' task vectors into one merged vector τ, and the merge is θ = θ_base + λ·τ:

* task arithmetic (Ilharco et al. 2023, 'Editing Models with Task Arithmetic', §2): τ = Σ_k τ_k;
* TIES-merging (Yadav et al. 2023, 'TIES-Merging: Resolving Interference When Merging Models', Alg. 1):
  1. trim: keep the top-k fraction of each τ_k by magnitude (over all its entries at once, as the reference's
     ``topk_values_mask``), zero the rest: τ̂_k;
  2. elect: γ = sgn(Σ_k τ̂_k) per entry — the sign of the larger total mass (a zero sum takes the sign of the
     sum of all γ, as the reference's ``resolve_sign``);
  3. disjoint merge: τ = mean of τ̂_k over the k with sgn(τ̂_k) = γ (entries that are zero in all: 0);
* DARE (Yu et al. 2024, 'Language Models are Super Mario', Eq. 1): each τ_k's entries dropped with probability
  p and the kept ones rescaled by 1/(1 − p), from a seeded generator, then task arithmetic over them;
* Model Breadcrumbs (Davari & Belilovsky 2024, 'Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
  Masks', §3): per layer (parameter tensor), the entries of τ_k ranked by magnitude, the smallest β fraction and
  the largest 1 − γ fraction masked, then task arithmetic over them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import MergescopeError

Vector = dict[str, torch.Tensor]  # parameter name -> float64 tensor


def task_vectors(states: Sequence[Mapping[str, torch.Tensor]], base: Mapping[str, torch.Tensor],
                 names: Sequence[str]) -> list[Vector]:
    """τ_k = θ_k − θ_base for every parameter in ``names`` (float64)."""
    missing = [n for n in names if n not in base or base[n].shape != states[0][n].shape]
    if missing:
        raise MergescopeError(f"the base model does not have the merged models' parameter '{missing[0]}' "
                              "(same architecture needed)")
    return [{n: s[n].double() - base[n].double() for n in names} for s in states]


def apply_task_vector(base: Mapping[str, torch.Tensor], tau: Vector, lam: float) -> dict[str, torch.Tensor]:
    """θ = θ_base + λ·τ for the parameters of ``tau`` (in the base's dtypes)."""
    return {n: (base[n].double() + lam * t.to(base[n].device)).to(base[n].dtype) for n, t in tau.items()}


def summed(taus: Sequence[Vector]) -> Vector:
    """Σ_k τ_k (task arithmetic's merged vector)."""
    return {n: sum(t[n] for t in taus) for n in taus[0]}


def _check_fraction(name: str, value: float, low_open: bool = False) -> None:
    ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
    if not ok:
        raise MergescopeError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")


def trim_top_k(tau: Vector, k: float) -> Vector:
    """TIES step 1: τ with only its ⌊k·d⌋ largest magnitudes kept, over all its d entries at once (entries tied
    with the largest dropped magnitude are dropped too; the reference keeps that threshold entry as well)."""
    _check_fraction("TIES's k", k, low_open=True)
    flat = torch.cat([t.reshape(-1) for t in tau.values()]).abs()
    d = flat.numel()
    drop = d - int(d * k)
    if drop == 0:
        return {n: t.clone() for n, t in tau.items()}
    threshold = flat.kthvalue(drop).values  # the largest dropped magnitude
    return {n: torch.where(t.abs() > threshold, t, torch.zeros_like(t)) for n, t in tau.items()}


def elect_sign(taus: Sequence[Vector]) -> Vector:
    """TIES step 2: γ = sgn(Σ_k τ̂_k) per entry; where the sum is 0, the sign of Σ γ over all entries."""
    gamma = {n: torch.sign(sum(t[n] for t in taus)) for n in taus[0]}
    majority = torch.sign(sum(g.sum() for g in gamma.values()))
    majority = majority if majority != 0 else torch.ones((), dtype=majority.dtype)
    return {n: torch.where(g == 0, majority, g) for n, g in gamma.items()}


def disjoint_mean(taus: Sequence[Vector], gamma: Vector) -> Vector:
    """TIES step 3: per entry the mean of the τ̂_k whose sign is γ (0 where none is)."""
    out = {}
    for n, g in gamma.items():
        stacked = torch.stack([t[n] for t in taus])  # (K, ...)
        agree = torch.where(g > 0, stacked > 0, stacked < 0)
        count = agree.sum(0).clamp_min(1)
        out[n] = (stacked * agree).sum(0) / count
    return out


def ties_vector(taus: Sequence[Vector], k: float) -> Vector:
    """TIES-merging's merged task vector (trim, elect, disjoint merge; module docstring)."""
    trimmed = [trim_top_k(t, k) for t in taus]
    return disjoint_mean(trimmed, elect_sign(trimmed))


def dare(tau: Vector, p: float, generator: torch.Generator) -> Vector:
    """DARE: each entry dropped with probability ``p``, the rest rescaled by 1/(1 − p) (the Bernoulli draws come
    from ``generator`` on the CPU, parameter by parameter in order, so a seed gives the same drops anywhere)."""
    if not 0 <= p < 1:
        raise MergescopeError(f"DARE's drop rate p must be in [0, 1), got {p}")
    out = {}
    for n, t in tau.items():
        keep = torch.rand(t.shape, generator=generator, dtype=torch.float64) >= p  # drop with probability p
        out[n] = t * keep.to(t.device) / (1.0 - p)
    return out


def breadcrumbs_mask(tau: Vector, beta: float, gamma: float) -> Vector:
    """Model Breadcrumbs: per parameter tensor, the ⌊β·n⌋ entries of smallest magnitude and the ⌊(1 − γ)·n⌋ of
    largest magnitude set to 0 (the rest kept as they are)."""
    _check_fraction("Breadcrumbs' beta", beta)
    _check_fraction("Breadcrumbs' gamma", gamma)
    if beta > gamma:
        raise MergescopeError(f"Breadcrumbs masks below beta and above gamma: beta ≤ gamma needed, got {beta} > "
                              f"{gamma}")
    out = {}
    for n, t in tau.items():
        flat = t.reshape(-1)
        size = flat.numel()
        order = flat.abs().argsort(stable=True)  # ascending magnitude
        keep = torch.zeros(size, dtype=torch.bool, device=t.device)
        keep[order[int(beta * size): size - int((1 - gamma) * size)]] = True
        out[n] = (flat * keep).reshape(t.shape)
    return out
