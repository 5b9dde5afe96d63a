"""RegMean (Jin et al. 2023, 'Dataless Knowledge Fusion by Merging Weights of Language Models', ICLR 2023).

Per linear layer, the weight whose outputs are closest (least squares, §3.1, Eq. 2) to every model's own outputs
on its own inputs X_k::

    W* = argmin_W Σ_k ‖X_k Wᵀ − X_k W_kᵀ‖²   ⇒   W*ᵀ = (Σ_k G̃_k)⁻¹ Σ_k G̃_k W_kᵀ,

with G_k = X_kᵀX_k / n_k the mean Gram matrix of the layer's inputs (the reference keeps the running mean over
its n_k rows) and the off-diagonal entries scaled by α (§3.2; the reference's reduction of the non-diagonal
items): G̃_k = α G_k + (1 − α) diag(G_k). A convolution (groups = 1) is a linear layer on its unfolded input
patches (rows: images × output positions; columns: C_in·kh·kw), its weight viewed as (C_out, C_in·kh·kw).
Input dimensions that are zero in every model's data (a dead ReLU channel) leave the system singular and
decoupled: their weight columns are the weighted mean of the models'. Biases and every other tensor are not
RegMean's: the weighted mean (:func:`mergescope.merge.aggregate.weighted_average`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ArchitectureError, MergescopeError

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def regmean_layers(model: nn.Module) -> list[str]:
    """The modules RegMean merges: every nn.Linear and every convolution with groups = 1 and zero padding."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear)
            or (isinstance(m, _CONVS) and m.groups == 1 and m.padding_mode == "zeros" and m.padding != "same")]


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows (n, d): a linear layer's inputs, or a convolution's unfolded patches."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (B, d, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    if isinstance(module, nn.Conv1d):
        patches = F.unfold(x.unsqueeze(-1), (module.kernel_size[0], 1), (module.dilation[0], 1),
                           (module.padding[0], 0), (module.stride[0], 1))
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    raise ArchitectureError(f"RegMean cannot unfold the inputs of a {type(module).__name__}")


def input_grams(model: nn.Module, batches: Iterable, layers: Sequence[str] | None = None,
                device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Per layer, the mean Gram matrix G = XᵀX / n of its inputs over ``batches`` (float64, eval mode)."""
    model = model.to(device).eval()
    layers = regmean_layers(model) if layers is None else list(layers)
    modules = dict(model.named_modules())
    sums = {n: None for n in layers}
    counts = dict.fromkeys(layers, 0)

    def hook_for(name):
        def hook(module, args):
            for images in args[0].detach().split(16):  # unfolded patches of 16 images at a time
                rows = layer_rows(module, images).double()  # (n, d)
                g = rows.T @ rows
                sums[name] = g if sums[name] is None else sums[name] + g
                counts[name] += len(rows)
        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in layers]
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch.x.to(device))
    finally:
        for h in handles:
            h.remove()
    unseen = [n for n in layers if counts[n] == 0]
    if unseen:
        raise MergescopeError(f"RegMean saw no input at layer '{unseen[0]}' (no data, or the layer is unused)")
    return {n: sums[n] / counts[n] for n in layers}


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = α·G + (1 − α)·diag(G): the off-diagonal entries scaled by α, the diagonal kept."""
    return alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))


def regmean_weight(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float,
                   mix: Sequence[float]) -> torch.Tensor:
    """W* of one layer (module docstring) from the models' weights (C_out, ...) and input Gram matrices (d, d);
    ``mix``: the weights of the mean used for input dimensions no model's data reaches."""
    if not 0 <= alpha <= 1:
        raise MergescopeError(f"RegMean's alpha must be in [0, 1], got {alpha}")
    flat = [w.double().reshape(w.shape[0], -1) for w in weights]  # (C_out, d)
    scaled = [scale_off_diagonal(g.to(flat[0].device), alpha) for g in grams]
    lhs = sum(scaled)  # (d, d)
    rhs = sum(g @ w.T for g, w in zip(scaled, flat))  # (d, C_out)
    out = sum(m * w for m, w in zip(mix, flat))  # dead dimensions: the weighted mean
    live = torch.diagonal(lhs) > 0
    out[:, live] = torch.linalg.solve(lhs[live][:, live], rhs[live]).T
    return out.reshape(weights[0].shape).to(weights[0].dtype)


def weight_key(layer: str) -> str:
    """The state key of a layer's weight (the model itself, ``""``, is a bare layer)."""
    return f"{layer}.weight" if layer else "weight"


def regmean_state(states: Sequence[Mapping[str, torch.Tensor]], grams: Sequence[Mapping[str, torch.Tensor]],
                  alpha: float, mix: Sequence[float]) -> dict[str, torch.Tensor]:
    """``{layer.weight: W*}`` for every layer in ``grams[0]``."""
    return {weight_key(layer): regmean_weight([s[weight_key(layer)] for s in states], [g[layer] for g in grams],
                                              alpha, mix)
            for layer in grams[0]}
