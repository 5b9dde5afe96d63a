"""MergeMany (Ainsworth et al. 2023, Git Re-Basin, Algorithm 3): align N models to their common average.

Aligning every model to one reference ties the merged space to that model. MergeMany instead looks for the
permutations that make all N models agree: in random order, each model in turn is weight-matched
(:func:`weight_matching`) onto the average of the *other* models as they are currently permuted, until a round
changes no permutation. Each model then has its own permutation into the common space; the merge is the plain
average of the permuted models. Git Re-Basin reports that this merge degrades quickly with the number of models
(CIFAR-10 accuracy from 82 % with 3 models to 18.5 % with 12, without REPAIR; rebasin's benchmark) — which is
what :mod:`mergescope.many` measures against the map-based merges.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..perm import PermSpec, apply_permutation, identity_perms
from .result import MatchResult
from .weight_matching import weight_matching


def merge_many_matching(
    states: Sequence[Mapping[str, torch.Tensor]],
    spec: PermSpec,
    max_rounds: int = 20,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[MatchResult]:
    """Permutations of every model into the models' common space (one :class:`MatchResult` per model).

    Args:
        states: state dicts of N ≥ 2 models with the architecture of ``spec``.
        max_rounds: at most this many rounds over all models.
        seed: seed of the model order in each round (and of weight matching's group order).

    Example:
        >>> results = merge_many_matching([m.state_dict() for m in models], spec)
        >>> merged = merge_models_with_maps(models, [1 / len(models)] * len(models),
        ...                                 [permutation_maps(r.perms) for r in results])
    """
    if len(states) < 2:
        raise ValueError(f"MergeMany needs at least two models, got {len(states)}")
    keys = list(spec.param_axes)
    floats = [{k: s[k].detach().to(device, torch.float32) for k in keys} for s in states]
    results = [MatchResult(identity_perms(spec), {}, "weight (MergeMany)") for _ in states]
    permuted = [dict(f) for f in floats]
    rng = np.random.default_rng(seed)
    for round_ in range(max_rounds):
        changed = False
        for i in rng.permutation(len(states)):
            others = [permuted[j] for j in range(len(states)) if j != i]
            mean = {k: sum(o[k] for o in others) / len(others) for k in keys}
            res = weight_matching(mean, floats[i], spec, seed=seed + round_, device=device)
            if any(not torch.equal(res.perms[g], results[i].perms[g]) for g in res.perms):
                changed = True
            results[i] = MatchResult(res.perms, res.similarity, "weight (MergeMany)")
            permuted[i] = apply_permutation(floats[i], spec, res.perms)
        if not changed:
            break
    return results
