"""Applying permutations to state dicts and models, as described by a :class:`PermSpec`.

Convention: ``perm[i] = j`` means channel ``i`` of the permuted model is channel ``j`` of the original, so every
moved axis is re-indexed with ``index_select(axis, perm)``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .spec import PermAxis, PermSpec

Perms = dict[str, torch.Tensor]  # group name -> LongTensor permutation


def permute_axis(t: torch.Tensor, ax: PermAxis, perm: torch.Tensor) -> torch.Tensor:
    """Re-index one axis of ``t`` (viewed as (channels, block) when ``ax.block > 1``)."""
    if ax.block == 1:
        return t.index_select(ax.axis, perm.to(t.device))
    shape = t.shape
    blocked = t.reshape(*shape[: ax.axis], -1, ax.block, *shape[ax.axis + 1:])  # (..., C, S, ...)
    return blocked.index_select(ax.axis, perm.to(t.device)).reshape(shape)


def apply_permutation(state: dict[str, torch.Tensor], spec: PermSpec, perms: Perms) -> dict[str, torch.Tensor]:
    """Return a new state dict with every axis of every group in ``perms`` permuted (others untouched)."""
    out = dict(state)
    for group_name, perm in perms.items():
        for ax in spec.groups[group_name].axes:
            out[ax.param] = permute_axis(out[ax.param], ax, perm)
    return out


def permute_model(model: nn.Module, spec: PermSpec, perms: Perms) -> nn.Module:
    """A deep copy of ``model`` whose weights are permuted; it computes the same function."""
    new = copy.deepcopy(model)
    new.load_state_dict(apply_permutation(model.state_dict(), spec, perms))
    return new


def layer_orders(spec: PermSpec, perms: Perms, layers: list[str]) -> dict[str, torch.Tensor] | None:
    """Per observable layer, where each channel of the permuted model comes from.

    Channel ``c`` of layer ``name`` in ``permute_model(model, spec, perms)`` computes channel ``order[name][c]`` of
    the same layer in ``model``: the layer's group permutation, or the identity for a layer of no group (tied to
    the input or output) or of a group ``perms`` leaves alone. None when some layer is not one of ``spec.layers``
    (its channels' group is unknown).
    """
    orders = {}
    for name in layers:
        point = spec.layers.get(name)
        if point is None:
            return None
        perm = perms.get(point.group) if point.group is not None else None
        orders[name] = perm.cpu() if perm is not None else torch.arange(point.channels)
    return orders


def random_perms(spec: PermSpec, generator: torch.Generator | None = None) -> Perms:
    """A uniformly random permutation for every group (for tests and null baselines)."""
    return {name: torch.randperm(g.size, generator=generator) for name, g in spec.groups.items()}


def identity_perms(spec: PermSpec) -> Perms:
    return {name: torch.arange(g.size) for name, g in spec.groups.items()}


def invert(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: ``invert(p)[p[i]] == i``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm), device=perm.device)
    return inv
