"""Fisher-weighted averaging (Matena & Raffel 2022, 'Merging Models with Fisher-Weighted Averaging', NeurIPS 2022).

The diagonal of each model's Fisher information from data (§3, Eq. 3), with the expectation over the model's own
predictive distribution taken exactly over the classes (the reference's default, no sampled labels)::

    F_k = (1/N) Σ_n Σ_y p_θk(y | x_n) · (∇_θ log p_θk(y | x_n))²        (entrywise square)

and the merge (Eq. 4), per parameter entry, with merging coefficients λ_k (the merge weights)::

    θ* = Σ_k λ_k F̃_k θ_k / Σ_k λ_k F̃_k,    F̃_k = max(F_k, ε)          (ε: the reference's fisher_floor, 1e-6)

Per-example gradients come from ``torch.func`` (``vmap`` of ``grad``, one class at a time), in eval mode
(BatchNorm uses its running statistics, as at inference).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import MergescopeError


def diagonal_fisher(model: nn.Module, batches: Iterable, examples: int = 4096, device: torch.device | str = "cpu",
                    chunk: int = 64) -> dict[str, torch.Tensor]:
    """The diagonal Fisher F (module docstring) of every parameter of ``model`` over the first ``examples`` images
    of ``batches`` (float64, on ``device``).

    Args:
        model: a classifier returning logits.
        batches: batches with ``.x`` (labels unused: the expectation is over the model's own predictions).
        examples: at most this many images.
        chunk: images per vectorized gradient call (memory: chunk × parameters per class).
    """
    from torch.func import functional_call, grad, vmap

    if examples < 1:
        raise MergescopeError(f"Fisher averaging needs examples ≥ 1, got {examples}")
    model = model.to(device).eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    fisher = {n: torch.zeros(p.shape, dtype=torch.float64, device=device) for n, p in params.items()}

    def log_prob(p, x, y):
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return torch.log_softmax(logits, dim=-1)[0, y]

    per_example = vmap(grad(log_prob), in_dims=(None, 0, None))
    seen = 0
    for batch in batches:
        for x in batch.x[: examples - seen].to(device).split(chunk):
            with torch.no_grad():
                probs = torch.softmax(model(x).double(), dim=-1)  # (B, classes)
            for y in range(probs.shape[1]):
                grads = per_example(params, x, y)  # name -> (B, *shape)
                w = probs[:, y]
                for n, g in grads.items():
                    fisher[n] += torch.einsum("b,b...->...", w, g.double() ** 2)
            seen += len(x)
        if seen >= examples:
            break
    if seen == 0:
        raise MergescopeError("Fisher averaging got no data to compute the Fisher on")
    return {n: f / seen for n, f in fisher.items()}


def fisher_average(states: Sequence[Mapping[str, torch.Tensor]], fishers: Sequence[Mapping[str, torch.Tensor]],
                   weights: Sequence[float], floor: float = 1e-6) -> dict[str, torch.Tensor]:
    """θ* = Σ_k λ_k F̃_k θ_k / Σ_k λ_k F̃_k with F̃_k = max(F_k, floor), for every parameter in ``fishers[0]``
    (in the states' dtypes)."""
    if floor <= 0:
        raise MergescopeError(f"Fisher averaging's floor must be > 0, got {floor}")
    out = {}
    for n in fishers[0]:
        ref = states[0][n]
        num = sum(w * f[n].clamp_min(floor).to(ref.device) * s[n].double() for w, f, s in zip(weights, fishers, states))
        den = sum(w * f[n].clamp_min(floor).to(ref.device) for w, f in zip(weights, fishers))
        out[n] = (num / den).to(ref.dtype)
    return out
