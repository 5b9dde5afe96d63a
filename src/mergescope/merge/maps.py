"""Merging with linear maps instead of permutations: θ = Σ_k w_k · T_k(θ_k).

Every map-based method (CCA merging, OT fusion, regression merging, ZipIt!) gives, per model k and permutation
group g, a :class:`ChannelMap`: ``forward`` (C × C_k) takes model k's channels into the merged space
(feature ≈ forward @ feature_k) and ``inverse`` (C_k × C) takes them back (feature_k ≈ inverse @ feature). Model k
is rewritten in the merged space and the rewritten models are averaged with weights w_k:

* output axes of group g (the conv/linear weight rows, their bias): ``W ← forward @ W``, ``b ← forward @ b``;
* input axes that read group g: ``W ← W @ inverse`` (default inverse: the pseudo-inverse of ``forward``);
  an axis viewed as (channels, block) — a conv map flattened into a linear layer — is mapped block by block;
* axes in no group (the input image's channels, the logits): left alone, averaged with w_k.

**Permutations are permutations.** A map that is exactly a permutation matrix is applied by re-indexing (like
:func:`mergescope.perm.apply_permutation`), and when every model's map of a group is one, the group's
BatchNorm/LayerNorm parameters are permuted and averaged like any other tensor. So merging with permutation maps
*is* permutation merging, bit for bit (``interpolate_state(A, apply_permutation(B))``).

**BatchNorm under a general map.** A BatchNorm right after a conv/linear makes the pre-activation an affine
function of the conv's output, y = D·z + e per channel (D = γ/√(σ²+ε), e = β − D·μ). A general map does not
commute with that diagonal, and BatchNorm is not linear in its parameters, so its parameters cannot simply be
mapped. Instead ("refolding"), the pre-activation of each model is mapped exactly — y_merged = Σ_k w_k·forward_k
@ y_k — and written back into the original layers: the merged BatchNorm gets reference parameters (γ, μ, σ² a
convex combination of the models', through |w_k·forward_k| normalized per row; γ by magnitude, so D > 0), the
conv weight becomes D_ref⁻¹·(Σ_k w_k forward_k D_k W_k), and the constant goes into β (and the conv bias, if
any, gets the same convex combination). The merged model keeps the original architecture; its pre-activations
are exactly the weighted sum of the mapped models' pre-activations (given the same inputs to the layer);
running statistics are the reference ones, not re-estimated (RESET re-estimates them). A BatchNorm not directly
after a conv/linear (on a residual stream) or a LayerNorm cannot be passed by a general map: ArchitectureError.

**Nonlinearities.** ReLU (and max-pooling) commute with permutations and with positive diagonal scalings only.
For any other map the rewritten model is an approximation of the original one — exact at the pre-activation
of the group's own layers, approximate after the nonlinearity — which is why REPAIR/RESET matter more here.
The maps are fitted on features — post-activation (the spec's observation points) for CCA merging, regression and
ZipIt!, pre-activation for OT fusion — but applied to the layers' weights; that is the methods' own approximation.
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..errors import ArchitectureError
from ..perm import PermAxis, PermSpec, build_spec, permute_axis
from ..perm._graph import trace

Maps = Mapping[str, "ChannelMap"]  # group name -> map; a missing group is the identity


@dataclass(frozen=True)
class ChannelMap:
    """A linear change of a group's channel basis.

    Attributes:
        forward: (C, C_k): merged-space feature ≈ forward @ model feature; applied to the output axes.
        inverse: (C_k, C): model feature ≈ inverse @ merged-space feature; applied to the input axes.
            None: the pseudo-inverse of ``forward``.
    """

    forward: torch.Tensor
    inverse: torch.Tensor | None = None

    def inverse_matrix(self) -> torch.Tensor:
        if self.inverse is not None:
            return self.inverse
        return torch.linalg.pinv(self.forward.double())


@dataclass
class MapMergeResult:
    """A merged model with the maps that made it (what a method is and guarantees: its registry entry,
    :func:`mergescope.merge.methods.get_merge_method`).

    Attributes:
        model: the merged model.
        maps: per input model (in the order given), group -> ChannelMap into the merged space ({} = identity).
        weights: the averaging weights w_k.
        extras: method-specific results (e.g. ZipIt!'s merge/unmerge matrices).
    """

    model: nn.Module
    maps: list[dict[str, ChannelMap]]
    weights: list[float]
    extras: dict = field(default_factory=dict)


# -- where each group's axes live ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Creator:
    """A conv/linear whose output channels are a group's, with the BatchNorm right after it (if any)."""

    module: str
    weight: str
    bias: str | None
    norm: str | None  # module name of the BatchNorm that reads only this layer's output
    eps: float


@dataclass
class GroupLayout:
    """Which tensors of one group are outputs, which read it, and which norms sit on it."""

    creators: list[_Creator] = field(default_factory=list)
    inputs: list[PermAxis] = field(default_factory=list)  # axes of layers that read the group
    other_norms: list[str] = field(default_factory=list)  # norm modules not right after a creator


@dataclass
class MapLayout:
    """The spec plus the roles of its axes (built once per architecture by :func:`map_layout`)."""

    spec: PermSpec
    groups: dict[str, GroupLayout]
    norm_params: dict[str, list[str]]  # norm module -> its floating state keys on the channel axis


_NORM_PARAMS = ("weight", "bias", "running_mean", "running_var")


def _is_norm(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))


def map_layout(model: nn.Module, spec: PermSpec | None = None) -> MapLayout:
    """Classify every axis of ``spec`` as a group's output, a norm on it, or an input that reads it.

    The BatchNorm that directly follows a conv/linear (and is its only user) is found in the traced graph.
    """
    spec = spec or build_spec(model)
    gm = trace(model)
    modules = dict(model.named_modules())
    follows: dict[str, str] = {}  # BatchNorm module -> the conv/linear it normalizes
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(modules.get(src.target), (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))):
            follows[str(node.target)] = str(src.target)
    state = model.state_dict()
    groups: dict[str, GroupLayout] = {}
    norm_params: dict[str, list[str]] = {}
    for gname, group in spec.groups.items():
        gl = GroupLayout()
        creators: dict[str, dict] = {}
        norms: list[str] = []
        for ax in group.axes:
            mname, _, pname = ax.param.rpartition(".")
            mod = modules[mname]
            if _is_norm(mod):
                if mname not in norms:
                    norms.append(mname)
                    norm_params[mname] = [f"{mname}.{p}" for p in _NORM_PARAMS
                                          if f"{mname}.{p}" in state and state[f"{mname}.{p}"].is_floating_point()]
            elif ax.axis == 0:
                creators.setdefault(mname, {})[pname] = ax.param
            else:
                gl.inputs.append(ax)
        by_creator = {c: n for n, c in follows.items() if n in norms}
        for mname, params in creators.items():
            norm = by_creator.get(mname)
            eps = float(getattr(modules[norm], "eps", 1e-5)) if norm else 0.0
            gl.creators.append(_Creator(mname, params["weight"], params.get("bias"), norm, eps))
        gl.other_norms = [n for n in norms if n not in by_creator.values()]
        groups[gname] = gl
    return MapLayout(spec, groups, norm_params)


# -- applying maps to tensors -------------------------------------------------------------------------------

def permutation_index(t: torch.Tensor) -> torch.Tensor | None:
    """If ``t`` is exactly a permutation matrix, the index ``p`` with ``t[i, p[i]] == 1``; else None."""
    if t.dim() != 2 or t.shape[0] != t.shape[1]:
        return None
    ones = t == 1
    if not bool(((t == 0) | ones).all()) or not bool((ones.sum(0) == 1).all()) or not bool((ones.sum(1) == 1).all()):
        return None
    return ones.to(torch.int8).argmax(1)


def _left(t: torch.Tensor, fwd: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """forward @ t along axis 0 (re-indexing for a permutation; float64 otherwise)."""
    if idx is not None:
        return t.index_select(0, idx.to(t.device))
    out = fwd.double().to(t.device) @ t.double().reshape(t.shape[0], -1)  # (C, rest)
    return out.reshape(fwd.shape[0], *t.shape[1:])


def _right(t: torch.Tensor, ax: PermAxis, inv: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """t @ inverse along ``ax.axis``, viewed as (channels, block) when ``ax.block > 1``."""
    if idx is not None:
        return permute_axis(t, ax, idx)
    shape = t.shape
    c = inv.shape[0]
    blocked = t.double().reshape(*shape[: ax.axis], c, ax.block, *shape[ax.axis + 1:])  # (..., C_k, S, ...)
    moved = blocked.movedim(ax.axis, -1)  # (..., S, ..., C_k)
    out = (moved @ inv.double().to(t.device)).movedim(-1, ax.axis)  # (..., C, S, ...)
    return out.reshape(*shape[: ax.axis], inv.shape[1] * ax.block, *shape[ax.axis + 1:])


def _weighted_sum(ws: Sequence[float], ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """w₀·t₀ + w₁·t₁ + … in the tensors' dtype, in order (so two models give interpolate_state's bits)."""
    if any(t.dtype == torch.float64 for t in ts):
        ts = [t.double() for t in ts]
    return functools.reduce(lambda acc, wt: acc + wt[0] * wt[1], zip(ws[1:], ts[1:]), ws[0] * ts[0])


def _refold(states, work, weights, fwds, cr: _Creator, norm_keys: list[str]) -> dict[str, torch.Tensor]:
    """The merged conv + BatchNorm whose pre-activation is Σ_k w_k forward_k (D_k z_k + e_k) exactly."""
    bn = cr.norm
    ref = states[0]
    if f"{bn}.weight" not in ref or f"{bn}.running_var" not in ref:
        raise ArchitectureError(f"BatchNorm '{bn}' needs affine parameters and running statistics to be "
                                "merged with a non-permutation map")
    lin, shift, absmix = 0.0, 0.0, []
    for k, (state, w, fwd) in enumerate(zip(states, weights, fwds)):
        g, beta = state[f"{bn}.weight"].double(), state[f"{bn}.bias"].double()
        mu, var = state[f"{bn}.running_mean"].double(), state[f"{bn}.running_var"].double()
        d = g / (var + cr.eps).sqrt()  # (C_k,)
        bias = work[k][cr.bias].double() if cr.bias else torch.zeros_like(d)
        wgt = work[k][cr.weight].double()
        f = torch.eye(len(d), dtype=torch.float64, device=d.device) if fwd is None else fwd.double().to(d.device)
        lin = lin + w * _left(wgt * d.view(-1, *[1] * (wgt.dim() - 1)), f, None)
        shift = shift + w * (f @ (beta + d * (bias - mu)))
        absmix.append((w * f).abs())
    total = sum(m.sum(1) for m in absmix).clamp_min(1e-300)  # (C,)
    mix = [m / total.unsqueeze(1) for m in absmix]  # convex weights per merged channel

    def combine(key: str, fn=lambda t: t) -> torch.Tensor:
        return sum(m @ fn(s[key].double()) for m, s in zip(mix, states))

    gamma, mu, var = combine(f"{bn}.weight", torch.abs), combine(f"{bn}.running_mean"), combine(f"{bn}.running_var")
    d_ref = gamma / (var + cr.eps).sqrt()
    gamma = torch.where(d_ref > 0, gamma, (var + cr.eps).sqrt())  # a channel with γ = 0 everywhere: D_ref = 1
    d_ref = gamma / (var + cr.eps).sqrt()
    out = {cr.weight: lin / d_ref.view(-1, *[1] * (lin.dim() - 1))}
    bias = torch.zeros_like(d_ref)
    if cr.bias:
        bias = sum(m @ w_[cr.bias].double() for m, w_ in zip(mix, work))
        out[cr.bias] = bias
    out.update({f"{bn}.weight": gamma, f"{bn}.running_mean": mu, f"{bn}.running_var": var,
                f"{bn}.bias": shift - d_ref * (bias - mu)})
    unknown = set(norm_keys) - set(out)
    if unknown:
        raise ArchitectureError(f"don't know how to merge '{min(unknown)}' under a non-permutation map")
    return out


def combine_states(
    states: Sequence[Mapping[str, torch.Tensor]],
    layout: MapLayout,
    weights: Sequence[float],
    maps: Sequence[Maps],
) -> dict[str, torch.Tensor]:
    """θ = Σ_k w_k · T_k(θ_k): map every model's state into the merged space and average (module docstring).

    Args:
        states: state dicts of one architecture.
        layout: :func:`map_layout` of that architecture.
        weights: w_k (e.g. α, 1−α).
        maps: per model, group -> :class:`ChannelMap` (a missing group, or ``{}``, is the identity).

    Returns:
        The merged state dict (same keys, shapes and dtypes as ``states[0]``); integer buffers come from the
        model with the largest weight (the first on ties).
    """
    if not (len(states) == len(weights) == len(maps)):
        raise ValueError("combine_states: states, weights and maps must have the same length")
    keys = list(states[0])
    for s in states[1:]:
        if list(s) != keys:
            raise ArchitectureError("models differ in their tensors: not the same architecture")
    work = [dict(s) for s in states]
    for gname, gl in layout.groups.items():  # 1. input axes, each model into the merged space
        for k, m in enumerate(maps):
            if gname not in m:
                continue
            inv = m[gname].inverse_matrix()
            inv_t = inv.T.contiguous()
            idx = permutation_index(inv_t)  # inverse[p[i], i] = 1  <=>  inv_t[i, p[i]] = 1
            for ax in gl.inputs:
                work[k][ax.param] = _right(work[k][ax.param], ax, inv, idx)

    out: dict[str, torch.Tensor] = {}
    for gname, gl in layout.groups.items():  # 2. output axes and norms, per group
        fwds = [m[gname].forward if gname in m else None for m in maps]
        idxs = [None if f is None else permutation_index(f) for f in fwds]
        as_perm = all(f is None or i is not None for f, i in zip(fwds, idxs))
        for k, (f, i) in enumerate(zip(fwds, idxs)):
            if f is None or not as_perm:
                continue
            for cr in gl.creators:
                for key in filter(None, (cr.weight, cr.bias)):
                    work[k][key] = _left(work[k][key], f, i)
            for norm in [c.norm for c in gl.creators if c.norm] + gl.other_norms:
                for key in layout.norm_params[norm]:
                    work[k][key] = _left(work[k][key], f, i)
        if as_perm:
            continue  # the weighted sum below does the rest
        if gl.other_norms:
            raise ArchitectureError(f"norm layer '{gl.other_norms[0]}' (group '{gname}') is not right after a "
                                    "conv/linear: only permutation maps can pass it")
        for cr in gl.creators:
            if cr.norm is None:
                for key in filter(None, (cr.weight, cr.bias)):
                    out[key] = sum(w * _left(wk[key], f if f is not None else _eye_like(wk[key]), None)
                                   for w, wk, f in zip(weights, work, fwds))
            else:
                out.update(_refold(states, work, weights, fwds, cr, layout.norm_params[cr.norm]))

    heaviest = max(range(len(weights)), key=lambda k: (weights[k], -k))
    merged = {}
    for key in keys:
        ref = states[0][key]
        if key in out:
            merged[key] = out[key].to(ref.dtype)
        elif not ref.is_floating_point():
            merged[key] = states[heaviest][key].clone()
        else:
            merged[key] = _weighted_sum(weights, [wk[key] for wk in work]).to(ref.dtype)
    return merged


def _eye_like(t: torch.Tensor) -> torch.Tensor:
    return torch.eye(t.shape[0], dtype=torch.float64, device=t.device)


# -- models ------------------------------------------------------------------------------------------------

def merge_models_with_maps(models: Sequence[nn.Module], weights: Sequence[float], maps: Sequence[Maps],
                           layout: MapLayout | None = None) -> nn.Module:
    """A new model (architecture of ``models[0]``) with the state :func:`combine_states` makes."""
    layout = layout or map_layout(models[0])
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(combine_states([m.state_dict() for m in models], layout, weights, maps))
    return merged


def merge_with_maps(model_a: nn.Module, model_b: nn.Module, maps_b: Maps, alpha: float = 0.5,
                    layout: MapLayout | None = None) -> nn.Module:
    """α·A + (1−α)·T(B): B rewritten in A's channel space by ``maps_b`` (group -> ChannelMap), then interpolated.

    For permutation maps this is exactly permutation merging (``interpolate_model(A, permute_model(B))``).

    Example:
        >>> maps = cca_maps(stats)                       # or ot_maps, regression_maps, permutation_maps(perms)
        >>> merged = merge_with_maps(model_a, model_b, maps, 0.5)
    """
    return merge_models_with_maps([model_a, model_b], [alpha, 1.0 - alpha], [{}, maps_b], layout)


def map_model(model: nn.Module, maps: Maps, layout: MapLayout | None = None) -> nn.Module:
    """``model`` rewritten in another channel basis (exact for permutations and positive diagonal scalings,
    an approximation after each nonlinearity otherwise): the α = 0 endpoint of :func:`merge_with_maps`."""
    return merge_models_with_maps([model], [1.0], [maps], layout)


def permutation_maps(perms: Mapping[str, torch.Tensor]) -> dict[str, ChannelMap]:
    """The maps of a permutation alignment (``perm[i] = j``: aligned channel i is channel j)."""
    out = {}
    for g, p in perms.items():
        t = torch.zeros(len(p), len(p))
        t[torch.arange(len(p)), p.cpu()] = 1.0
        out[g] = ChannelMap(t, t.T.contiguous())
    return out


def per_group(map_fn, stats: Mapping[str, object]) -> tuple[dict[str, "ChannelMap"], dict]:
    """Apply ``map_fn(group stats) -> (map, extra)`` to every group: (maps, {group: extra})."""
    maps, extras = {}, {}
    for g, st in stats.items():
        maps[g], extras[g] = map_fn(st)
    return maps, extras
