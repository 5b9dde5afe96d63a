"""Metric-guided partial merging (thesis 000 §3.2.1, Fig. 3.2): merge only some channels of each group.

A model is built from model A and aligned model B' in which the selected channels of every permutation group
are α-interpolated, θ = α·θ_A + (1−α)·θ_B', and every other channel is *kept from A*, θ = θ_A.

What "a channel" is in weight space. Every element of every tensor belongs to exactly one channel, or to none:

1. A tensor whose axis 0 is moved by group g — the output rows of a conv/linear (its weight and bias), and the
   BatchNorm/LayerNorm weight, bias, running mean and running variance after it — belongs along axis 0:
   element ``[c, ...]`` is channel c of g. A channel is the filter that computes it plus its normalisation.
2. A tensor whose axis 0 is no group's but another axis is — the input axis of a layer whose outputs cannot be
   permuted, i.e. the classifier reading the last group (expanded over the flatten block ``H·W``) — belongs
   along that axis: column c (block) is channel c of g.
3. Anything else (the classifier's bias, integer buffers such as BatchNorm's step counter) belongs to no channel:
   it is merged only when every channel of every group is, so 100% is exactly the full merge and 0% exactly A.

The input axes of a layer whose *outputs* form a group are therefore not split by input channel: row ``[o, c]``
of the next conv belongs to its output channel o (rule 1). A merged channel reads every input channel with
merged weights and a kept channel applies exactly A's filter to whatever the previous layer now delivers.
Why: each element has one owner (so the endpoints are exact and no element has two conflicting rules); it is
the thesis's "merge a channel's filter"; and after alignment input channel c of A and of B' are meant to be the
same feature, so B''s weights reading a kept channel are as meaningful as reading a merged one. (Splitting the
next layer's input columns too would make one filter half A-only and half merged.) Residual groups
(ResNets) are one group: a channel of the stream is merged in every conv, BN and shortcut that writes it.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import MergescopeError
from ..evaluate import evaluate_models
from ..perm import PermSpec
from .interpolate import interpolate_state

DIRECTIONS = ("top", "bottom")  # top: the most similar channels are merged first; bottom: the least similar
DEFAULT_FRACTIONS = tuple(round(i / 10, 1) for i in range(11))  # 0, 10%, …, 100%


def select_channels(scores: torch.Tensor, fraction: float, direction: str = "top", *,
                    defined: torch.Tensor | None = None, higher_is_similar: bool = True,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Which channels of one group to merge: the ``round(fraction · C)`` first in the chosen order.

    Orders: ``"top"`` most similar first (highest score, or lowest when ``higher_is_similar=False``, e.g. for
    CLIP-δ), ``"bottom"`` least similar first, ``"random"`` a random permutation from ``generator``. Channels
    whose score is not defined (``defined`` False, e.g. dead channels) come last in "top" and "bottom"; ties
    keep channel order. ``round`` is half up.

    Returns:
        bool [C].
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    c = scores.numel()
    if not 0.0 <= fraction <= 1.0:
        raise MergescopeError(f"fraction must lie in [0, 1], got {fraction}")
    n = math.floor(fraction * c + 0.5)
    if direction == "random":
        order = torch.randperm(c, generator=generator)
    elif direction in DIRECTIONS:
        ok = torch.ones(c, dtype=torch.bool) if defined is None else torch.as_tensor(defined, dtype=torch.bool)
        similar_first = scores if higher_is_similar else -scores
        key = similar_first if direction == "top" else -similar_first
        key = torch.where(ok & torch.isfinite(scores), key, torch.full_like(key, -math.inf))
        order = torch.sort(key, descending=True, stable=True).indices
    else:
        raise MergescopeError(f"direction must be 'top', 'bottom' or 'random', got {direction!r}")
    mask = torch.zeros(c, dtype=torch.bool)
    mask[order[:n]] = True
    return mask


def _owners(spec: PermSpec) -> dict[str, tuple[int, str, int]]:
    """state_dict key -> (axis, group, block) of the channel that owns its elements (rules 1–2 above)."""
    blocks = {(ax.param, ax.axis): ax.block for g in spec.groups.values() for ax in g.axes}
    owners = {}
    for key, axes in spec.param_axes.items():
        if axes and axes[0] is not None:
            owners[key] = (0, axes[0], blocks[key, 0])
        else:
            axis = next((i for i, g in enumerate(axes) if g is not None), None)
            if axis is not None:
                owners[key] = (axis, axes[axis], blocks[key, axis])
    return owners


def partial_merge_state(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], spec: PermSpec,
                        selected: Mapping[str, torch.Tensor], alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """A state dict whose selected channels are α·A + (1−α)·B' and whose other channels are A's.

    Args:
        state_a, state_b: model A and model B *aligned to A* (same keys and shapes).
        spec: the permutation spec of the architecture.
        selected: group name -> bool [C], True = merge that channel; a group left out keeps all channels of A.
        alpha: interpolation weight of A for merged channels.

    Returns:
        The new state dict (ownership of elements as in the module docstring).
    """
    unknown = [g for g in selected if g not in spec.groups]
    if unknown:
        raise MergescopeError(f"unknown group '{unknown[0]}'; groups: {', '.join(spec.groups)}")
    masks = {}
    for g, group in spec.groups.items():
        m = torch.as_tensor(selected.get(g, torch.zeros(group.size, dtype=torch.bool)), dtype=torch.bool)
        if m.shape != (group.size,):
            raise MergescopeError(f"selection for group '{g}' has shape {tuple(m.shape)}, expected ({group.size},)")
        masks[g] = m
    everything = all(bool(m.all()) for m in masks.values())
    full = interpolate_state(state_a, state_b, alpha)
    owners = _owners(spec)
    out = {}
    for key, a in state_a.items():
        if key not in owners:
            out[key] = full[key] if everything else a.clone()
            continue
        axis, g, block = owners[key]
        m = masks[g].to(a.device).repeat_interleave(block)  # [C·block]
        shape = [1] * a.ndim
        shape[axis] = m.numel()
        out[key] = torch.where(m.reshape(shape), full[key], a)
    return out


def partial_merge_model(model_a: nn.Module, model_b: nn.Module, spec: PermSpec, selected: Mapping[str, torch.Tensor],
                        alpha: float = 0.5) -> nn.Module:
    """A new model with A's architecture and :func:`partial_merge_state` weights (``model_b`` aligned to A)."""
    merged = copy.deepcopy(model_a)
    merged.load_state_dict(partial_merge_state(model_a.state_dict(), model_b.state_dict(), spec, selected, alpha))
    return merged


def group_scores(spec: PermSpec, values: Mapping[str, torch.Tensor],
                 defined: Mapping[str, torch.Tensor] | None = None) -> tuple[dict, dict]:
    """Per-layer channel metrics -> per-group scores: the mean over the group's observed layers (ResNet
    streams are observed at several block outputs) of the defined values.

    Args:
        values: layer name -> float [C]; layers of no group are ignored.
        defined: layer name -> bool [C] (default: all defined).

    Returns:
        (scores, defined): group -> float64 [C], group -> bool [C] (defined in at least one layer).
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for layer, v in values.items():
        tap = spec.layers.get(layer)
        if tap is None or tap.group is None:
            continue
        v = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
        ok = torch.ones_like(v, dtype=torch.bool) if defined is None or layer not in defined else \
            torch.as_tensor(defined[layer], dtype=torch.bool)
        ok = ok & torch.isfinite(v)
        sums[tap.group] = sums.get(tap.group, 0) + torch.where(ok, v, 0.0)
        counts[tap.group] = counts.get(tap.group, 0) + ok.long()
    scores = {g: sums[g] / counts[g].clamp_min(1) for g in sums}
    return scores, {g: counts[g] > 0 for g in counts}


def partial_merge_curves(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermSpec,
    scores: Mapping[str, Mapping[str, torch.Tensor]],
    batches: Iterable,
    *,
    defined: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    higher_is_similar: Mapping[str, bool] | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    directions: Sequence[str] = DIRECTIONS,
    seeds: Sequence[int] = (0, 1, 2),
    alpha: float = 0.5,
    device: torch.device | str = "cpu",
    progress: bool = False,
    total: int | None = None,
) -> list[dict]:
    """Accuracy of partial merges along the fraction of merged channels, per metric and direction, against
    random channel choices; every distinct model is evaluated in one pass over ``batches``.

    Args:
        model_a, model_b: model A and model B aligned to A.
        spec: the permutation spec.
        scores: metric name -> group -> float [C] (see :func:`group_scores`).
        batches: evaluation batches (``.x``, ``.y``), e.g. ``iter_batches(test, 500)``.
        defined: metric name -> group -> bool [C]; undefined channels are merged last.
        higher_is_similar: metric name -> direction of the metric (default True; False for CLIP-δ).
        fractions: shares of each group's channels to merge.
        directions: "top" (most similar first) and/or "bottom".
        seeds: one random-channel baseline per seed (``torch.Generator().manual_seed(seed)``, one draw per group
            in spec order for each fraction).
        alpha: interpolation weight of A for merged channels.

    Returns:
        Rows ``{"metric", "direction", "fraction", "seed", "channels", "accuracy", "loss"}``; the random baseline
        has metric and direction ``"random"``; metric rows have seed None; ``channels`` counts merged channels.
        Models with identical selections (e.g. every 0% and every 100%) are built and evaluated once; memory is
        one model per distinct selection.

    Example:
        >>> scores, ok = group_scores(spec, {"features.2": tau})
        >>> rows = partial_merge_curves(a, b_aligned, spec, {"kendall_tau": scores}, iter_batches(test, 500),
        ...                             defined={"kendall_tau": ok})
    """
    higher_is_similar = dict(higher_is_similar or {})
    variants: list[tuple[dict, dict[str, torch.Tensor]]] = []
    for metric, by_group in scores.items():
        for direction in directions:
            for f in fractions:
                sel = {g: select_channels(by_group[g], f, direction,
                                          defined=(defined or {}).get(metric, {}).get(g),
                                          higher_is_similar=higher_is_similar.get(metric, True))
                       for g in spec.groups if g in by_group}
                variants.append(({"metric": metric, "direction": direction, "fraction": f, "seed": None}, sel))
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        for f in fractions:
            sel = {g: select_channels(torch.zeros(group.size), f, "random", generator=gen)
                   for g, group in spec.groups.items()}
            variants.append(({"metric": "random", "direction": "random", "fraction": f, "seed": int(seed)}, sel))

    model_a, model_b = model_a.to(device).eval(), model_b.to(device).eval()
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    models: dict[str, nn.Module] = {}
    keys = []
    for _, sel in variants:
        key = "|".join(f"{g}:{sel[g].numpy().tobytes().hex()}" if g in sel else f"{g}:-" for g in spec.groups)
        if key not in models:
            merged = copy.deepcopy(model_a)
            merged.load_state_dict(partial_merge_state(state_a, state_b, spec, sel, alpha))
            models[key] = merged
        keys.append(key)
    names = {key: f"variant{i}" for i, key in enumerate(models)}
    scored = evaluate_models({names[k]: m for k, m in models.items()}, batches, device=device, progress=progress,
                             total=total, desc="partial merges")
    rows = []
    for (info, sel), key in zip(variants, keys):
        rows.append({**info, "channels": int(sum(int(m.sum()) for m in sel.values())), **scored[names[key]]})
    return rows


__all__ = ["DEFAULT_FRACTIONS", "DIRECTIONS", "group_scores", "partial_merge_curves", "partial_merge_model",
           "partial_merge_state", "select_channels"]
