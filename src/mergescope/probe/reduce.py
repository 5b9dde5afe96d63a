"""Per-image channel activations: a feature map reduced to one number per (image, channel), inside the graph.

The activation of a channel for an image is the spatial **max** of its feature map (or the **mean**;
DESIGN.md "Definitions"). :func:`tap_reduced` splices the reduction into the traced model right after each
probed layer, so a forward pass returns only [B, C] per layer: full feature maps are freed as the network
goes on (a pass over many models never holds them all), and a later in-place operation on a layer's output
cannot change what was recorded.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import fx, nn

from .taps import tap_model

REDUCTIONS = ("max", "mean")


def reduce_activation(t: torch.Tensor, channel_dim: int = 1, reduction: str = "max") -> torch.Tensor:
    """A feature map (B, ..., C, ...) -> float32 [B, C]: the max (or mean) over everything but the channels.

    ``-0.0`` becomes ``+0.0`` so that equal activations compare equal bit for bit.
    """
    t = t.movedim(channel_dim, 1)  # (B, C, *rest)
    if t.dim() > 2:
        flat = t.flatten(2)  # (B, C, S)
        t = flat.amax(2) if reduction == "max" else flat.float().mean(2)
    return t.float() + 0.0  # [B, C]


def tap_reduced(model: nn.Module, channel_dims: Mapping[str, int], reduction: str = "max",
                traced: fx.GraphModule | None = None) -> fx.GraphModule:
    """Like :func:`mergescope.probe.tap_model`, but each tap returns ``reduce_activation`` of the layer: [B, C].

    Args:
        model: the model (parameters shared, nothing registered on it).
        channel_dims: canonical layer name -> the channel axis of its output.
        reduction: ``"max"`` or ``"mean"``.
        traced: ``model`` already traced (see :func:`mergescope.probe.tap_model`); it is modified.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    gm = tap_model(model, list(channel_dims), traced=traced)
    graph = gm.graph
    out_node = next(n for n in graph.nodes if n.op == "output")
    result, taps = out_node.args[0]
    reduced = {}
    for name, node in taps.items():
        with graph.inserting_after(node):  # runs before anything downstream can modify the tensor in place
            reduced[name] = graph.call_function(reduce_activation, (node, channel_dims[name], reduction))
    out_node.args = ((result, reduced),)
    gm.recompile()
    return gm
