"""MergeMany (Ainsworth et al. 2023, Git Re-Basin, Algorithm 3): align N models to their common average.

Aligning every model to one reference ties the merged space to that model. MergeMany instead looks for the
permutations that make all N models agree. Algorithm 3, as the reference runs it (samuela/git-re-basin,
``mnist_mlp_wm_many.py``, ``match_many``)::

    repeat (a round)
        for i in RandomPermutation(1..N):
            Θ' = 1/(N-1) Σ_{j≠i} Θ_j                       # the others, as they are permuted now
            Θ_i = PermutationCoordinateDescent(Θ', Θ_i)     # Algorithm 1, started from Θ_i's current state
    until no model got closer to the average of the others in the last round
    return 1/N Σ_j Θ_j

The distance is the L2 norm of the difference of the permutable weights; weight matching never increases it, so
the round's summed decrease is ≥ 0 and the descent stops when it is 0. Randomness: one
``numpy.random.default_rng(seed)``; each round draws the model order (``permutation(N)``), then, for each model
in that order, the seed of its weight matching (``integers(2**31)``). Each model ends with its own permutation
(composed over the rounds) into the common space; the merge is the plain average of the permuted models.
Git Re-Basin reports that this merge degrades quickly with the number of models (CIFAR-10 accuracy from 82 %
with 3 models to 18.5 % with 12, without REPAIR; rebasin's benchmark) — which is what :mod:`mergescope.many`
measures against the map-based merges.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..perm import PermSpec, apply_permutation, identity_perms
from .result import MatchResult
from .weight_matching import weight_matching


def _distance(x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of ``x − y`` over the permutable weights (float64)."""
    return float(sum(((x[k].double() - y[k].double()) ** 2).sum() for k in x)) ** 0.5


def merge_many_matching(
    states: Sequence[Mapping[str, torch.Tensor]],
    spec: PermSpec,
    max_rounds: int = 100,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[MatchResult]:
    """Permutations of every model into the models' common space (one :class:`MatchResult` per model).

    Args:
        states: state dicts of N ≥ 2 models with the architecture of ``spec``.
        max_rounds: at most this many rounds over all models (the reference's ``max_iter``, 100).
        seed: seed of the model orders and of the weight matchings' group orders (module docstring).

    Returns:
        Per model, ``perms`` from the original model into the common space and ``similarity`` the cost matrices of
        its last weight matching (against the average of the others at that step), columns = original channels.

    Example:
        >>> results = merge_many_matching([m.state_dict() for m in models], spec)
        >>> merged = merge_models_with_maps(models, [1 / len(models)] * len(models),
        ...                                 [permutation_maps(r.perms) for r in results])
    """
    if len(states) < 2:
        raise ValueError(f"MergeMany needs at least two models, got {len(states)}")
    n, keys = len(states), list(spec.param_axes)
    current = [{k: s[k].detach().to(device, torch.float32) for k in keys} for s in states]  # Θ_i, permuted so far
    total = [identity_perms(spec) for _ in states]  # original model i -> current[i]
    sims: list[dict[str, np.ndarray]] = [{} for _ in states]
    rng = np.random.default_rng(seed)
    for _ in range(max_rounds):
        decrease = 0.0
        for i in rng.permutation(n).tolist():
            target = {k: sum(current[j][k] for j in range(n) if j != i) / (n - 1) for k in keys}
            before = _distance(target, current[i])
            res = weight_matching(target, current[i], spec, seed=int(rng.integers(2**31)), device=device)
            current[i] = apply_permutation(current[i], spec, res.perms)
            prev = total[i]
            total[i] = {g: prev[g][res.perms[g].to(prev[g].device)] for g in prev}
            sims[i] = {g: _reindex(res.similarity[g], prev[g]) for g in prev}
            decrease += before - _distance(target, current[i])
        if decrease <= 1e-12:
            break
    return [MatchResult({g: p.cpu() for g, p in t.items()}, s, "weight (MergeMany)") for t, s in zip(total, sims)]


def _reindex(cost: np.ndarray, prev: torch.Tensor) -> np.ndarray:
    """A cost over the current model's channels (column j = original channel ``prev[j]``) over the original's."""
    out = np.empty_like(cost)
    out[:, prev.cpu().numpy()] = cost
    return out
