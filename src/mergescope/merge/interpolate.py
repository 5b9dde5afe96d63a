"""Linear interpolation of weights: θ(α) = α·θ_A + (1−α)·θ_B (DESIGN.md; Frankle et al. 2020)."""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import ArchitectureError


def interpolate_state(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """α·A + (1−α)·B for every floating tensor; integer buffers (BatchNorm's step counter), which cannot be
    interpolated, are taken from the nearer endpoint (A for α ≥ 0.5, B below).

    Written as a weighted sum (not ``lerp``) so α = 1 gives A and α = 0 gives B bit for bit.
    """
    if state_a.keys() != state_b.keys():
        missing = sorted(set(state_a).symmetric_difference(state_b))[0]
        raise ArchitectureError(f"models differ in their tensors (e.g. '{missing}'): not the same architecture")
    out = {}
    for k, a in state_a.items():
        b = state_b[k]
        if a.shape != b.shape:
            raise ArchitectureError(f"tensor '{k}' has shape {tuple(a.shape)} in A but {tuple(b.shape)} in B")
        out[k] = alpha * a + (1.0 - alpha) * b if a.is_floating_point() else (a if alpha >= 0.5 else b).clone()
    return out


def interpolate_model(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """A new model with A's architecture and the weights α·θ_A + (1−α)·θ_B."""
    merged = copy.deepcopy(model_a)
    merged.load_state_dict(interpolate_state(model_a.state_dict(), model_b.state_dict(), alpha))
    return merged


def alpha_grid(step: float = 0.05) -> list[float]:
    """α = 0, step, …, 1 and always 0.5, the midpoint every barrier table reports (rounded so 0.5 is exactly 0.5;
    ``step`` = 1/n, e.g. 1/3 gives 0, 1/3, 0.5, 2/3, 1)."""
    n = round(1 / step)
    return sorted({round(i / n, 10) for i in range(n + 1)} | {0.5})
