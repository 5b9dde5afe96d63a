"""Weight aggregation in one parameter space: the weighted mean of state dicts, the models it is made of.

The pure core of every aggregation method (:mod:`mergescope.merge.methods`, family ``"aggregation"``): state dicts
in, a state dict out. A method that defines only some tensors (task vectors over the parameters, RegMean over the
linear/conv weights) starts from :func:`weighted_average` for the rest — so every running statistic of a BatchNorm
is *carried*: averaged with the merge weights like any other tensor (a task vector of a variance could make it
negative). ``+reset`` recomputes them on data; SWA does so itself (:func:`recompute_batchnorm`).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import ArchitectureError, MergescopeError

State = Mapping[str, torch.Tensor]


def normalized(weights: Sequence[float] | None, n: int) -> list[float]:
    """``weights`` scaled to sum to 1 (None: 1/n each); a negative weight or a zero sum is a one-line error."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise MergescopeError(f"merge weights must be {n} non-negative numbers with a positive sum, got "
                              f"{list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def check_same_keys(states: Sequence[State]) -> list[str]:
    """The state dicts' common keys (in order); a difference in keys or shapes is an ArchitectureError."""
    keys = list(states[0])
    for s in states[1:]:
        if list(s) != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise ArchitectureError("models differ in their tensors: not the same architecture")
    return keys


def weighted_average(states: Sequence[State], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """θ = Σ_k w_k θ_k with the weights normalized to sum to 1 (None: the uniform mean, FedSGD's and the uniform
    soup's θ = (1/N) Σ_k θ_k).

    Every floating tensor is summed in float64 and cast back to its dtype; integer buffers (BatchNorm's
    ``num_batches_tracked``) come from the model with the largest weight (the first on ties).
    """
    keys = check_same_keys(states)
    ws = normalized(weights, len(states))
    heaviest = max(range(len(ws)), key=lambda k: (ws[k], -k))
    out = {}
    for key in keys:
        ref = states[0][key]
        if ref.is_floating_point():
            out[key] = sum(w * s[key].double() for w, s in zip(ws, states)).to(ref.dtype)
        else:
            out[key] = states[heaviest][key].clone()
    return out


def fedavg_weights(sample_counts: Sequence[int]) -> list[float]:
    """FedAvg's weights w_k = n_k / Σ_j n_j (McMahan et al. 2017, Alg. 1) from each client's number of examples."""
    if not sample_counts or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in sample_counts):
        raise MergescopeError(f"sample counts must be positive integers, got {list(sample_counts)}")
    total = sum(sample_counts)
    return [n / total for n in sample_counts]


def parameter_names(model: nn.Module) -> list[str]:
    """The state keys that are trainable parameters (task vectors, Fisher and RegMean act on these only)."""
    return [name for name, _ in model.named_parameters()]


def with_state(template: nn.Module, state: State) -> nn.Module:
    """A copy of ``template`` holding ``state``."""
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model.eval()


def recompute_batchnorm(model: nn.Module, batches: Iterable, device: torch.device | str = "cpu") -> nn.Module:
    """Every BatchNorm's running statistics recomputed on ``batches`` in place (RESET's pass,
    :func:`mergescope.merge.repair_many`: the cumulative average over the batches, as SWA's ``update_bn``);
    a model without BatchNorm is returned as it is."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        from .repair import repair_many

        repair_many([], None, batches, reset=[model], device=device)
    return model.eval()
