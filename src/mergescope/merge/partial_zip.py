"""Partial zipping (ZipIt!, Stoica et al. 2024 §4.4): zip two models up to a layer, run both models' rest.

The zipped model Z (:func:`mergescope.merge.zipit_merge`) computes, in every group, the merged features
M·[y_A; y_B]. Cut its traced graph after ``layer``: the nodes up to the cut run once, in Z; every tensor that
crosses the cut is *unmerged* into each model's channel basis (y_A ≈ U_A·y, y_B ≈ U_B·y — the ZipIt! unmerge
matrices, each row one-hot, so unmerging copies a merged channel to each of its members and commutes with ReLU
and pooling); A's and B's own remaining layers then run on their unmerged inputs, and the output is
α·out_A + (1−α)·out_B. A tensor whose channels belong to no group (the input image) crosses unchanged.

This needs extra layers: the result holds Z's trunk and both models' heads (a multi-head model), so it is not a
model of the original architecture; its parameter count grows as the cut moves towards the input. Cutting after
the last layer with channels gives the full zip's function (the heads are then linear). The cut is any layer of
:attr:`PermSpec.layers` (``mergescope layers`` lists them).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import fx, nn

from ..errors import ArchitectureError
from ..perm import PermSpec
from ..perm._graph import trace
from .maps import ChannelMap


def change_basis(t: torch.Tensor, matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """``matrix`` (C_out × C_in) applied along the channel axis ``dim`` of ``t``."""
    return (t.movedim(dim, -1) @ matrix.T.to(t.dtype)).movedim(-1, dim)


def _blend(out_a: torch.Tensor, out_b: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha * out_a + (1.0 - alpha) * out_b


class PartialZip(nn.Module):
    """Container of the three models a partially zipped graph calls into (``zip``, ``a``, ``b``): copies, so
    that RESET or fine-tuning of the partial zip leaves the models it was made of alone."""

    def __init__(self, zipped: nn.Module, model_a: nn.Module, model_b: nn.Module):
        super().__init__()
        self.zip, self.a, self.b = (copy.deepcopy(m) for m in (zipped, model_a, model_b))


def partial_zip_model(
    zipped: nn.Module,
    model_a: nn.Module,
    model_b: nn.Module,
    inverses: tuple[Mapping[str, ChannelMap], Mapping[str, ChannelMap]],
    spec: PermSpec,
    layer: str,
    alpha: float = 0.5,
) -> fx.GraphModule:
    """The model that runs ``zipped`` up to ``layer`` and A's and B's own layers after it (module docstring).

    Args:
        zipped: the full zip of A and B (original architecture).
        model_a, model_b: the two models (their layers after the cut are used as they are).
        inverses: the zip's maps of A and of B (their ``inverse`` unmerges a merged tensor into the model's basis).
        spec: the permutation spec of the architecture (with ``tensors``: build it with the current version).
        layer: the cut, a name from ``spec.layers``.
        alpha: weight of A's output.

    Returns:
        A traced module (an ``fx.GraphModule`` holding copies of the three models under ``zip``, ``a``, ``b``).
    """
    if layer not in spec.layers:
        raise ArchitectureError(f"unknown layer '{layer}' to zip up to; the layers are: {', '.join(spec.layers)}")
    gm = trace(model_a)
    nodes = list(gm.graph.nodes)
    cut = next(i for i, n in enumerate(nodes) if n.name == spec.layers[layer].node)
    trunk, head = nodes[: cut + 1], nodes[cut + 1:]
    in_trunk = set(trunk)
    crossing = [n for n in trunk if any(u not in in_trunk for u in n.users)]

    root = PartialZip(zipped, model_a, model_b)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in trunk:
        env[node] = _copy(graph, node, env, "zip")
    envs = {"a": dict(env), "b": dict(env)}
    for node in crossing:
        if node.op == "placeholder":
            continue
        tap = spec.tensors.get(node.name)
        if tap is None:
            raise ArchitectureError(f"the cut after '{layer}' crosses '{node.name}', whose channel axis is unknown "
                                    "(a flattened tensor?): cut at another layer")
        if tap.group is None:
            continue
        for side, maps in zip("ab", inverses):
            inverse = maps[tap.group].inverse_matrix().float() if tap.group in maps else None
            if inverse is None:
                continue
            name = f"unmerge_{side}_{node.name}"
            root.register_buffer(name, inverse.contiguous())
            mat = graph.get_attr(name)
            envs[side][node] = graph.call_function(change_basis, (env[node], mat, tap.channel_dim))
    outputs = {}
    for side in "ab":
        for node in head:
            if node.op == "output":
                outputs[side] = fx.map_arg(node.args[0], lambda n: envs[side][n])
            else:
                envs[side][node] = _copy(graph, node, envs[side], side)
    if not all(isinstance(o, fx.Node) for o in outputs.values()):
        raise ArchitectureError("partial zipping needs a model that returns one tensor")
    graph.output(graph.call_function(_blend, (outputs["a"], outputs["b"], float(alpha))))
    return fx.GraphModule(root, graph, class_name="PartialZip")


def _copy(graph: fx.Graph, node: fx.Node, env: dict[fx.Node, fx.Node], prefix: str) -> fx.Node:
    """``node`` copied into ``graph`` with its inputs from ``env`` and its module/attribute under ``prefix``."""
    new = graph.node_copy(node, lambda n: env[n])
    if node.op in ("call_module", "get_attr"):
        new.target = f"{prefix}.{node.target}"
    return new
