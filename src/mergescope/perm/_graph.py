"""Tracing helpers shared by the permutation spec and the data pass: fx tracing, shapes, canonical names."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import ArchitectureError


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; untraceable models get a one-line ArchitectureError."""
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, NotImplementedError...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArchitectureError(
            f"{type(model).__name__} cannot be traced by torch.fx ({first}); "
            "mergescope derives permutations from the traced graph"
        ) from None


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Record every node's output shape in ``node.meta['tensor_meta']`` by running ``example`` through."""
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArchitectureError(
            f"the model does not accept an input of shape {tuple(example.shape)}: {first}"
        ) from None
    finally:
        gm.train(was_training)


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The output shape of a tensor node (after :func:`propagate_shapes`), or None for non-tensors."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def canonical_names(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """A readable, unique name for every node, based on the dotted ``named_modules()`` names.

    A node that is the value a block returns is named after the block (the innermost container module whose
    last node it is): ``layer1.0`` for a ResNet block output. Otherwise a leaf module's output is named after
    the leaf (``features.2`` for a VGG ReLU); a repeated call of a shared leaf is ``layer1.0.relu@1``.
    Other function calls are ``<scope>.<function>`` (``layer1.0.relu``), with ``@k`` added for repeats.
    """
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    stacks = {n: list((n.meta.get("nn_module_stack") or {}).keys()) for n in nodes}
    last_of_scope: dict[str, fx.Node] = {}
    for n in nodes:
        for key in stacks[n]:
            last_of_scope[key] = n

    def is_block(key: str) -> bool:
        module = modules.get(key.split("@")[0])
        return module is not None and next(module.children(), None) is not None

    names: dict[fx.Node, str] = {}
    used: set[str] = set()
    for n in nodes:
        stack = stacks[n]
        ends = [k for k in stack if last_of_scope.get(k) is n]
        blocks = [k for k in ends if is_block(k) and "@" not in k]
        if blocks:
            name = blocks[-1]
        elif ends and ends[-1] == (stack[-1] if stack else None):
            name = ends[-1]  # a leaf module's own output ("features.2", "layer1.0.relu@1")
        elif n.op == "call_module":
            name = str(n.target)
        else:  # a function call inside a block: "layer1.0.relu" (the fx counter suffix dropped)
            scope = next((k for k in reversed(stack) if "@" not in k), "")
            base = n.name.rstrip("0123456789").rstrip("_") if n.op == "call_function" else n.name
            name = f"{scope}.{base}" if scope else n.name
        if name in used:
            k = 1
            while f"{name}@{k}" in used:
                k += 1
            name = f"{name}@{k}"
        used.add(name)
        names[n] = name
    return names


def is_metadata_query(node: fx.Node) -> bool:
    """Whether ``node`` reads only a tensor's metadata (``x.shape``, ``x.size(1)``, ``x.ndim``, ``len(x)``): a
    value computed from sizes carries no channels, unlike, say, the tuple of tensors a ``split`` returns."""
    if node.op == "call_method":
        return node.target in METADATA_METHODS
    return node.op == "call_function" and node.target in METADATA_FUNCTIONS


# Elementwise ops that keep every channel where it is.
ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Hardswish,
    nn.Hardtanh, nn.Softplus, nn.Mish, nn.PReLU,
)
PASSTHROUGH_MODULES = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_F = torch.nn.functional
ACTIVATION_FUNCTIONS = {
    torch.relu, _F.relu, torch.sigmoid, _F.sigmoid, torch.tanh, _F.tanh, _F.gelu, _F.silu, _F.elu,
    _F.leaky_relu, _F.relu6, _F.hardswish, _F.hardtanh, _F.softplus, _F.mish,
    torch.relu_, "relu", "sigmoid", "tanh", "relu_", "sigmoid_", "tanh_",  # methods (timm's in-place Sigmoid, Tanh)
}
PASSTHROUGH_FUNCTIONS = {
    _F.dropout, _F.max_pool1d, _F.max_pool2d, _F.max_pool3d, _F.avg_pool1d, _F.avg_pool2d,
    _F.avg_pool3d, _F.adaptive_avg_pool1d, _F.adaptive_avg_pool2d, _F.adaptive_avg_pool3d,
    _F.adaptive_max_pool2d, "contiguous", "clone", "detach", "float", "to",
}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, "add", "add_"}
SCALE_FUNCTIONS = {operator.mul, operator.truediv, torch.mul, "mul", "div", operator.imul}
RESHAPE_FUNCTIONS = {torch.flatten, "flatten", "view", "reshape"}
METADATA_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "get_device", "type"}
METADATA_FUNCTIONS = {getattr, len, torch.numel}  # getattr: x.shape, x.ndim, x.dtype (a tensor attribute is a tensor)
