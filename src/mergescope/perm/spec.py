"""The permutation spec, derived from a model's traced graph (never written by hand).

A *group* is a set of weight axes that must be permuted together for the network to compute the same function:
the output axis of a conv/linear, the axes of the BatchNorm that follows it, the input axis of every layer that
reads it — and, through a residual add, every conv whose output joins the same stream. Flattening a conv
feature map into a linear layer expands each channel into a block of ``H*W`` input features.

The graph is walked once in topological order, labelling each tensor with the group its channel axis belongs
to; residual adds union groups (union-find). Groups tied to the network's input or output cannot be permuted
and are dropped. Along the way the spec records, per group, where its channels can be *observed*
(post-activation outputs, residual block outputs), the *repair points* (pre-activation outputs of each
conv/linear, after its BatchNorm if any) and the *residual block outputs* (a residual add, after the activation
that follows it) — the points REPAIR corrects (:mod:`mergescope.merge.repair`).

Where a residual stream is measured. A residual-stream group is observed at many places (the stem's activation
and every block output of the stage). REPAIR's reference notebooks (Jordan et al. 2023, KellerJordan/REPAIR:
``Merge-ResNet50-ImageNet`` and ``Train-and-Permute-CIFAR10-ResNet20``) match a stream once, on the output of the
*last* block of its stage — the sub-network ``blocks[:k+1]`` with k the stage's last block — and apply that one
permutation to every conv/BN writing into the stream. :func:`observation_points` gives that place by default
(``"stage_end"``: the group's last observation point in graph order) and the average over every place as an
option (``"all"``). (One ResNet20 notebook, ``Permute-CIFAR10-ResNet20``, indexes the third stage one block early;
we follow the stage end, as the ResNet50 and the other ResNet20 notebook do.) A group observed at one place (every
non-residual group) is the same under both rules.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from ..errors import ArchitectureError
from . import _graph as G


@dataclass(frozen=True)
class PermAxis:
    """One weight axis moved by a group's permutation."""

    param: str  # state_dict key
    axis: int  # tensor axis
    block: int = 1  # the axis is viewed as (channels, block): flatten expands a channel into `block` features


@dataclass(frozen=True)
class TapPoint:
    """A place in the graph where a group's channels are visible."""

    name: str  # canonical name (dotted module name where possible)
    node: str  # fx node name in the traced graph
    group: str | None  # the group whose channels this tensor carries (None: not permutable, e.g. the logits)
    channels: int  # number of channels
    channel_dim: int  # axis of the channels in the tensor (1 for NCHW conv maps and (N, C) features)
    spatial: bool  # the tensor has positions besides batch and channels (a conv feature map, N×C×H×W);
    # False: a flat feature vector (N, C), e.g. a linear layer's output


@dataclass(frozen=True)
class RepairPoint:
    """A pre-activation output whose per-channel mean/std REPAIR sets, and where that fix is fused."""

    tap: TapPoint
    module: str  # module whose affine parameters absorb the correction (a BatchNorm, or the conv/linear itself)
    kind: str  # "batchnorm" or "layer"


@dataclass
class PermGroup:
    """One permutation: its size, the weight axes it moves, and where its channels are observed."""

    name: str
    size: int
    axes: list[PermAxis] = field(default_factory=list)
    observe: list[TapPoint] = field(default_factory=list)


MATCH_POINTS = ("stage_end", "all")  # where a group is measured for matching and joint statistics


def observation_points(group: PermGroup, points: str = "stage_end") -> list[TapPoint]:
    """The places whose statistics measure ``group`` (module docstring): ``"stage_end"`` — the last place the group
    is observed in graph order (a residual stream: the output of its stage's last block, as REPAIR's reference
    measures it); ``"all"`` — every observation point (stem activation and every block output)."""
    if points == "stage_end":
        return group.observe[-1:]
    if points == "all":
        return list(group.observe)
    raise ValueError(f"points must be one of {', '.join(MATCH_POINTS)}; got {points!r}")


@dataclass
class PermSpec:
    """Everything mergescope knows about a model's permutation symmetry.

    Attributes:
        groups: the permutation groups, in graph order, by name.
        param_axes: for every state_dict key that some group moves, its axes (each None or a group name).
        repair_points: the pre-activation outputs (after the BatchNorm if any) of every permutable conv/linear,
            in graph order: the points of the architecture-preserving REPAIR.
        layers: every observable layer (post-activation outputs, block outputs), in graph order, by canonical
            name — what :func:`list_layers` prints; :func:`select_layers` picks the probe's layers from them
            (by default the convolutional ones: ``TapPoint.spatial``).
        fixed: names of creator layers whose channels cannot be permuted (tied to the input or output).
        tensors: every tensor of the traced graph whose channel axis is known (not flattened), by fx node name:
            its group (None: tied to the input or output) and channel axis — e.g. what crosses a cut through
            the graph (:func:`mergescope.merge.partial_zip.partial_zip_model`).
        activation_inputs: for every post-activation layer, the tensor entering its activation (a residual
            block output: the sum of the add, before the ReLU) — a stream's pre-activations.
    """

    groups: dict[str, PermGroup]
    param_axes: dict[str, tuple[str | None, ...]]
    repair_points: list[RepairPoint]
    layers: dict[str, TapPoint]
    fixed: list[str]
    tensors: dict[str, TapPoint] = field(default_factory=dict)
    block_outputs: list[TapPoint] = field(default_factory=list)  # residual block outputs (add, + activation)
    activation_inputs: dict[str, TapPoint] = field(default_factory=dict)  # post-activation layer -> what entered it

    def describe(self) -> str:
        lines = [f"{len(self.groups)} permutation groups"]
        for g in self.groups.values():
            obs = ", ".join(t.name for t in g.observe)
            lines.append(f"  {g.name}: {g.size} channels, {len(g.axes)} weight axes, observed at {obs}")
        return "\n".join(lines)


@dataclass
class _Label:
    gid: int  # union-find id
    dim: int  # channel axis of the tensor
    block: int = 1  # >1 once a (N, C, H, W) map has been flattened to (N, C*H*W)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def make(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> int:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)
        return min(ri, rj)


def default_example_input(model: nn.Module) -> torch.Tensor:
    """A small input the model accepts, from the first layer's type and the zoo's recorded input size."""
    size = getattr(model, "input_size", None)  # zoo models record (C, H, W)
    if size is not None:
        return torch.zeros(2, *size)
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if isinstance(first, nn.Linear):
        return torch.zeros(2, first.in_features)
    if isinstance(first, nn.Conv2d):
        return torch.zeros(2, first.in_channels, 64, 64)
    raise ArchitectureError(f"{type(model).__name__}: give an example input (no conv or linear layer found)")


def build_spec(model: nn.Module, example_input: torch.Tensor | None = None) -> PermSpec:
    """Derive the permutation spec of ``model`` from its torch.fx graph.

    Args:
        model: any module whose forward is symbolically traceable (the zoo, torchvision CNNs, most timm CNNs).
        example_input: an input batch used to learn tensor shapes (default: a guess from the first layer).

    Returns:
        The :class:`PermSpec`. Unsupported structure raises :class:`ArchitectureError` naming the graph node.

    Example:
        >>> from mergescope.models import create_model
        >>> spec = build_spec(create_model("resnet20", width=1))
        >>> sorted(spec.groups)[:2]
        ['conv1', 'layer1.0.conv1']
    """
    return traced_spec(model, example_input)[0]


def traced_spec(model: nn.Module, example_input: torch.Tensor | None = None) -> tuple[PermSpec, fx.GraphModule]:
    """:func:`build_spec`, and the traced graph module the spec was read from (it shares the model's parameters):
    a caller that also taps the model (:func:`mergescope.probe.tap_model`'s ``traced``) need not trace it again."""
    gm = G.trace(model)
    G.propagate_shapes(gm, default_example_input(model) if example_input is None else example_input)
    return _SpecBuilder(gm).build(), gm


class _SpecBuilder:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.names = G.canonical_names(gm)
        self.uf = _UnionFind()
        self.labels: dict[fx.Node, _Label] = {}
        self.fixed_ids: list[int] = []
        self.axes: list[tuple[int, PermAxis]] = []
        self.creators: list[tuple[int, str, int]] = []  # (gid, module name, channels)
        self.creator_nodes: dict[fx.Node, int] = {}
        self.activation_nodes: set[fx.Node] = set()
        self.add_nodes: set[fx.Node] = set()
        self.bn_of: dict[fx.Node, fx.Node] = {}  # creator node -> the BatchNorm node right after it

    # -- helpers -------------------------------------------------------------------------------------
    def _fail(self, node: fx.Node, why: str) -> ArchitectureError:
        return ArchitectureError(f"cannot derive permutations at graph node '{self.names[node]}' "
                                 f"({node.op} {getattr(node.target, '__name__', node.target)}): {why}")

    def _tensor_args(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a in self.labels]

    def _only_input(self, node: fx.Node) -> _Label:
        ins = self._tensor_args(node)
        if len(ins) != 1:
            raise self._fail(node, f"expected one permutable tensor input, got {len(ins)}")
        return self.labels[ins[0]]

    def _param_axis(self, gid: int, module: str, pname: str, axis: int, block: int = 1) -> None:
        key = f"{module}.{pname}" if module else pname
        if getattr(self.modules[module], pname, None) is not None:
            self.axes.append((gid, PermAxis(key, axis, block)))

    # -- node rules ----------------------------------------------------------------------------------
    def _conv_or_linear(self, node: fx.Node, mod: nn.Module) -> None:
        name = str(node.target)
        lab = self._only_input(node)
        is_linear = isinstance(mod, nn.Linear)
        shape_in = G.shape_of(node.args[0])
        if is_linear:
            if lab.dim != len(shape_in) - 1:
                raise self._fail(node, "linear layer reads an axis that is not the permuted channel axis")
        else:
            if mod.groups != 1:
                raise self._fail(node, f"grouped convolution (groups={mod.groups}) is not supported")
            if lab.dim != 1 or lab.block != 1:
                raise self._fail(node, "convolution input is not a channels-first feature map")
        self._param_axis(lab.gid, name, "weight", 1, lab.block)
        gid = self.uf.make()
        self._param_axis(gid, name, "weight", 0)
        self._param_axis(gid, name, "bias", 0)
        out_shape = G.shape_of(node)
        self.labels[node] = _Label(gid, len(out_shape) - 1 if is_linear else 1)
        self.creators.append((gid, name, mod.out_features if is_linear else mod.out_channels))
        self.creator_nodes[node] = gid

    def _norm(self, node: fx.Node, mod: nn.Module) -> None:
        lab = self._only_input(node)
        if isinstance(mod, nn.LayerNorm):
            if len(mod.normalized_shape) != 1 or lab.dim != len(G.shape_of(node)) - 1:
                raise self._fail(node, "LayerNorm must normalize exactly the channel axis")
        elif lab.dim != 1 or lab.block != 1:
            raise self._fail(node, "BatchNorm input is not channels-first")
        for pname in ("weight", "bias", "running_mean", "running_var"):
            self._param_axis(lab.gid, str(node.target), pname, 0)
        self.labels[node] = lab
        src = node.args[0]
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and src in self.creator_nodes and len(src.users) == 1:
            self.bn_of[src] = node

    def _reshape(self, node: fx.Node) -> None:
        lab = self._only_input(node)
        shape_in, shape_out = G.shape_of(node.args[0]), G.shape_of(node)
        if shape_in == shape_out:
            self.labels[node] = lab
            return
        flattens_channels = (
            lab.dim == 1 and len(shape_out) == 2 and shape_out[0] == shape_in[0]
            and shape_out[1] == _prod(shape_in[1:])
        )
        if not flattens_channels:
            raise self._fail(node, f"reshape {shape_in} -> {shape_out} mixes the channel axis")
        self.labels[node] = _Label(lab.gid, 1, lab.block * _prod(shape_in[2:]))

    def _add(self, node: fx.Node) -> None:
        ins = self._tensor_args(node)
        if len(ins) == 1:
            self.labels[node] = self.labels[ins[0]]
            return
        a, b = (self.labels[i] for i in ins)
        if (a.dim, a.block) != (b.dim, b.block):
            raise self._fail(node, "adds tensors whose channel axes differ")
        self.labels[node] = _Label(self.uf.union(a.gid, b.gid), a.dim, a.block)
        self.add_nodes.add(node)

    def _reduce(self, node: fx.Node) -> None:
        lab = self._only_input(node)
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        dims = (dims,) if isinstance(dims, int) else dims
        rank = len(G.shape_of(node.args[0]))
        if dims is None or any(d % rank <= lab.dim for d in dims) or lab.block != 1:
            raise self._fail(node, "reduction over the channel axis")
        self.labels[node] = lab

    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            gid = self.uf.make()
            self.fixed_ids.append(gid)
            self.labels[node] = _Label(gid, 1)
            return
        if node.op == "output":
            for a in node.all_input_nodes:
                if a in self.labels:
                    self.fixed_ids.append(self.labels[a].gid)
            return
        if node.op == "get_attr":
            return
        if G.shape_of(node) is None:  # not a tensor: a size or shape, or several tensors (a split)
            if self._tensor_args(node) and not G.is_metadata_query(node):
                raise self._fail(node, "turns a feature map into a value that is not one tensor (e.g. a split)")
            return
        if not self._tensor_args(node):
            return  # a tensor that does not depend on the input (a constant, a mask built from sizes)
        target = node.target
        if node.op == "call_module":
            mod = self.modules[target]
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                self._conv_or_linear(node, mod)
            elif isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                self._norm(node, mod)
            elif isinstance(mod, G.ACTIVATION_MODULES):
                if isinstance(mod, nn.PReLU) and mod.num_parameters != 1:
                    raise self._fail(node, "per-channel PReLU is not supported")
                self.labels[node] = self._only_input(node)
                self.activation_nodes.add(node)
            elif isinstance(mod, G.PASSTHROUGH_MODULES):
                self.labels[node] = self._only_input(node)
            elif isinstance(mod, nn.Flatten):
                self._reshape(node)
            else:
                raise self._fail(node, f"layer type {type(mod).__name__} is not supported")
            return
        if target in G.ACTIVATION_FUNCTIONS:
            self.labels[node] = self._only_input(node)
            self.activation_nodes.add(node)
        elif target in G.PASSTHROUGH_FUNCTIONS:
            self.labels[node] = self._only_input(node)
        elif target in G.ADD_FUNCTIONS:
            self._add(node)
        elif target in G.SCALE_FUNCTIONS and len(self._tensor_args(node)) == 1:
            self.labels[node] = self._only_input(node)
        elif target in G.RESHAPE_FUNCTIONS:
            self._reshape(node)
        elif target in ("mean", torch.mean, "amax", torch.amax, "sum", torch.sum):
            self._reduce(node)
        else:
            raise self._fail(node, "operation not supported by the permutation tracer")

    # -- assembly ------------------------------------------------------------------------------------
    def build(self) -> PermSpec:
        for node in self.gm.graph.nodes:
            self._visit(node)
        uf = self.uf
        fixed_roots = {uf.find(i) for i in self.fixed_ids}
        groups: dict[int, PermGroup] = {}
        fixed: list[str] = []
        for gid, name, size in self.creators:
            root = uf.find(gid)
            if root in fixed_roots:
                fixed.append(name)
            elif root not in groups:
                groups[root] = PermGroup(name=name, size=size)
            elif groups[root].size != size:
                raise ArchitectureError(f"layer '{name}' joins group '{groups[root].name}' with "
                                        f"{size} channels instead of {groups[root].size}")
        param_axes: dict[str, list[str | None]] = {}
        params = dict(self.gm.state_dict())
        for gid, ax in self.axes:
            root = uf.find(gid)
            if root not in groups:
                continue
            ndim = params[ax.param].dim()
            param_axes.setdefault(ax.param, [None] * ndim)[ax.axis] = groups[root].name
            groups[root].axes.append(ax)

        def tap(node: fx.Node) -> TapPoint:
            lab = self.labels[node]
            root = uf.find(lab.gid)
            group = groups[root].name if root in groups else None
            shape = G.shape_of(node)
            return TapPoint(self.names[node], node.name, group, shape[lab.dim], lab.dim, len(shape) > 2)

        layers: dict[str, TapPoint] = {}
        block_outputs: list[TapPoint] = []
        activation_inputs: dict[str, TapPoint] = {}
        for node in self.gm.graph.nodes:
            if node not in self.labels or self.labels[node].block != 1:
                continue
            post_act = node in self.activation_nodes
            block_out = node in self.add_nodes and not any(u in self.activation_nodes for u in node.users)
            after_add = post_act and any(a in self.add_nodes for a in node.all_input_nodes)
            if post_act or block_out:
                t = tap(node)
                layers[t.name] = t
                if post_act:
                    activation_inputs[t.name] = tap(self._tensor_args(node)[0])
                if (block_out or after_add) and t.group is not None:
                    block_outputs.append(t)
                if t.group is not None:
                    groups[uf.find(self.labels[node].gid)].observe.append(t)
        for root, g in groups.items():
            if not g.observe:  # no nonlinearity after it: observe the creator's (or its BN's) output
                node = next(n for n, gid in self.creator_nodes.items() if uf.find(gid) == root)
                t = tap(self.bn_of.get(node, node))
                g.observe.append(t)
                layers.setdefault(t.name, t)

        repair_points = []
        for node, gid in self.creator_nodes.items():
            if uf.find(gid) in fixed_roots:
                continue  # the logits (or anything tied to them) are not renormalized
            bn = self.bn_of.get(node)
            point = bn if bn is not None else node
            repair_points.append(RepairPoint(tap(point), str(point.target), "batchnorm" if bn is not None else "layer"))

        return PermSpec(
            groups={g.name: g for g in groups.values()},
            param_axes={k: tuple(v) for k, v in param_axes.items()},
            repair_points=repair_points,
            layers=layers,
            fixed=fixed,
            tensors={n.name: tap(n) for n, lab in self.labels.items() if lab.block == 1},
            block_outputs=block_outputs,
            activation_inputs=activation_inputs,
        )


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def list_layers(model: nn.Module, example_input: torch.Tensor | None = None) -> list[str]:
    """The canonical names of every observable layer of ``model`` (what the probe and matching look at)."""
    return list(build_spec(model, example_input).layers)
