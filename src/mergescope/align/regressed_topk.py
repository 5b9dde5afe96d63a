"""Top-k images of *regressed* B channels (issue 5, items 2 and 4): does a sparse linear combination of B's
channels pick the same images as the A channel it explains?

For a group observed at layer L and a regression map (W, c) of A's channels on B's (:mod:`.regression`), the
regressed channel i is the feature map ŷ_i(x, pos) = Σ_j W_ij · b_j(x, pos) + c_i, and its activation for an
image is the spatial **max** (or mean) of that map — the reduction of the combination, *not* the combination of
B's per-channel maxima (those differ whenever B's channels peak at different positions). All maps of all groups
are applied in ONE pass over the dataset: B is tapped at every layer (full feature maps), each group's stacked
maps are one batched einsum (a 1×1 convolution), reduced spatially and fed to a :class:`StreamingTopK` per map;
A is tapped in the same pass (reduced in-graph) for its own top-k, and B's reduced activations give the top-k of
B's *best single channel* (argmax_j |W_ij| of the full fit, B's channel as it is).

A group observed at several places (a residual stream: the stem and every block output of a stage) has ONE fit,
pooled over all its observation points (:mod:`.covariance`), but its top-k is ranked at **every** observation
point separately: the same maps applied to B's feature map at that layer, compared with A's top-k at that same
layer. The result has one :class:`GroupTopK` per observation point, keyed by layer (R² is the group's, the same at
each of its layers; the recovered fractions are the layer's own).

Recovered fraction per A channel: |T_A ∩ T_regressed| / k, NaN where A's activation is constant over the
ranked images (a dead channel has no top-k to recover) or over the fitting subset (the fit gives it no weights).
The ranked images are whatever ``batches`` holds; ``mergescope regress`` ranks every image outside the fitting
subset (:mod:`mergescope.studies.regress`), so the top-k too is judged out of sample.

Inside a ``torch.distributed`` process group each rank ranks its share of the batches and the top-k (exactly:
:class:`StreamingTopK` merges shards without loss) and A's activation ranges are combined over the ranks
(:mod:`mergescope.distributed`): every rank gets the one-process result.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..distributed import all_reduce, merge_over_ranks, shard, world
from ..perm import PermSpec
from ..probe.engine import run_pass
from ..probe.reduce import reduce_activation, tap_reduced
from ..probe.taps import tap_model
from ..probe.topk import StreamingTopK
from .regression import RegressionFit, RegressionResult, keep_count

MAX_ELEMENTS = 1 << 25  # regressed feature-map elements materialised at once (maps are chunked to fit)


@dataclass
class RegressedMap:
    """Top-k of one regression map's regressed channels."""

    label: str
    m: int
    fraction: float
    refit: bool
    ids: np.ndarray  # int64 [C_A, k]
    values: np.ndarray  # float32 [C_A, k]
    recovered: np.ndarray  # float [C_A]: |T_A ∩ T_regressed| / k (NaN: A's channel constant on the data)
    r2: np.ndarray  # float [C_A] on the held-out subset (RegressionFit.r2)
    r2_fit: np.ndarray  # float [C_A] on the fitting subset (in-sample)


@dataclass
class GroupTopK:
    """One group's A top-k, B's best single channel and every regressed map, at one of its observation points."""

    group: str
    layer: str
    k: int
    a_ids: np.ndarray  # [C_A, k]
    a_values: np.ndarray
    constant: np.ndarray  # bool [C_A]: A's activation is the same for every image
    single: np.ndarray  # int [C_A]: B's best single channel per A channel
    single_ids: np.ndarray  # [C_A, k]
    single_values: np.ndarray
    single_recovered: np.ndarray
    channels_b: int
    maps: dict[str, RegressedMap] = field(default_factory=dict)


def recovered_fraction(a_ids: torch.Tensor | np.ndarray, ids: torch.Tensor | np.ndarray) -> np.ndarray:
    """|T_A ∩ T| / k per row of two [C, k] id arrays."""
    a, b = np.asarray(a_ids), np.asarray(ids)
    return np.array([len(set(x.tolist()) & set(y.tolist())) / max(len(x), 1) for x, y in zip(a, b)], dtype=float)


def _recovered(a_ids: np.ndarray, ids: np.ndarray, constant: np.ndarray) -> np.ndarray:
    """:func:`recovered_fraction`, NaN where A's channel is constant on the data."""
    r = recovered_fraction(a_ids, ids)
    r[constant] = np.nan
    return r


def regressed_activations(fmap: torch.Tensor, weight: torch.Tensor, intercept: torch.Tensor,
                          channel_dim: int = 1, reduction: str = "max") -> torch.Tensor:
    """Reduced regressed channels of a batch: the spatial max (or mean) of Σ_j W_ij b_j(x, pos) + c_i.

    Args:
        fmap: B's feature map (N, …, C_B, …) with the channels at ``channel_dim``.
        weight: (M, C_A, C_B) stacked maps; intercept: (M, C_A).

    Returns:
        float32 (N, M, C_A).
    """
    x = fmap.movedim(channel_dim, 1).float()  # (N, C_B, *S)
    n, mm, ca = x.shape[0], weight.shape[0], weight.shape[1]
    w = weight.reshape(mm * ca, -1).to(x)
    y = torch.einsum("oc,nc...->no...", w, x)  # (N, M*C_A, *S): the combination, position by position
    y = y + intercept.reshape(mm * ca, *([1] * (x.dim() - 2))).to(x)
    return reduce_activation(y, 1, reduction).reshape(n, mm, ca)


def _dedup_fits(result: RegressionResult, group: str) -> list[RegressionFit]:
    """The full fit and the sweep of a group, one fit per (m, refit) (the sweep's "all refit" IS the full fit)."""
    seen, fits = set(), []
    for f in [result.fits[group], *result.sweep.get(group, [])]:
        key = (f.m, f.refit or f.m == f.weight.shape[1])
        if key not in seen:
            seen.add(key)
            fits.append(f)
    return sorted(fits, key=lambda f: (f.m, f.refit))


def regressed_topk(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermSpec,
    result: RegressionResult,
    batches: Iterable,
    k: int = 10,
    groups: Sequence[str] | None = None,
    fits: Mapping[str, Sequence[RegressionFit]] | None = None,
    reduction: str = "max",
    device: torch.device | str = "cpu",
    progress: bool = False,
    total: int | None = None,
) -> dict[str, GroupTopK]:
    """Top-k images of A's channels, B's best single channels and the regressed B channels, in ONE pass.

    Args:
        model_a, model_b: the models of ``result`` (A explained by B).
        spec: their permutation spec.
        result: the regression alignment of B onto A.
        batches: the images to rank (batches with ``.ids`` and ``.x``), e.g. ``iter_batches(train, 256)``.
        k: images per channel.
        groups: restrict to these groups (default: every fitted group).
        fits: group -> the maps to rank (default: the full fit and the whole sweep, one per (m, refit)).

    Returns:
        layer -> :class:`GroupTopK` for every observation point of every group (a residual stream: one per
        layer it is observed at), in graph order; maps keyed by label in ``.maps``.
    """
    groups = [g for g in (groups or list(result.fits)) if g in result.fits]
    chosen = {g: list(fits[g]) if fits and g in fits else _dedup_fits(result, g) for g in groups}
    order = {name: i for i, name in enumerate(spec.layers)}
    points = sorted(((g, t) for g in groups for t in spec.groups[g].observe),  # (group, tap), graph order
                    key=lambda p: order.get(p[1].name, len(order)))
    layers = [t.name for _, t in points]
    if len(set(layers)) != len(layers):
        raise ValueError(f"a layer observes several groups: {layers}")
    dims = {t.name: t.channel_dim for _, t in points}
    tapped = {"a": tap_reduced(model_a, dims, reduction).to(device).eval(),
              "b": tap_model(model_b, layers).to(device).eval()}
    stacked = {g: (torch.stack([f.weight for f in chosen[g]]).float().to(device),
                   torch.stack([f.intercept for f in chosen[g]]).float().to(device)) for g in groups}
    size = {g: result.fits[g].weight.shape for g in groups}  # (C_A, C_B)
    a_top = {t.name: StreamingTopK(size[g][0], k, device, f"A {t.name}") for g, t in points}
    b_top = {t.name: StreamingTopK(size[g][1], k, device, f"B {t.name}") for g, t in points}
    maps_top = {t.name: [StreamingTopK(size[g][0], k, device, f"{f.label} {t.name}") for f in chosen[g]]
                for g, t in points}
    lo = {name: None for name in layers}
    hi = {name: None for name in layers}

    def consume(batch, x, outs):
        ids = batch.ids
        a_red, b_maps = outs["a"][1], outs["b"][1]
        for g, t in points:
            name = t.name
            a = a_red[name]  # (N, C_A)
            a_top[name].update(a, ids)
            lo[name] = a.amin(0) if lo[name] is None else torch.minimum(lo[name], a.amin(0))
            hi[name] = a.amax(0) if hi[name] is None else torch.maximum(hi[name], a.amax(0))
            fmap = b_maps[name]
            b_top[name].update(reduce_activation(fmap, t.channel_dim, reduction), ids)
            w, c = stacked[g]
            per_map = fmap[0].numel() * w.shape[1]
            chunk = max(1, MAX_ELEMENTS // max(per_map * fmap.shape[0], 1))
            for s in range(0, len(w), chunk):
                y = regressed_activations(fmap, w[s:s + chunk], c[s:s + chunk], t.channel_dim, reduction)
                for i in range(y.shape[1]):
                    maps_top[name][s + i].update(y[:, i], ids)

    batches, total = shard(batches, total)
    run_pass(tapped, batches, consume, device=device, desc="regressed top-k", total=total, progress=progress)
    a_top, b_top, maps_top, lo, hi = _combine_ranks(a_top, b_top, maps_top, lo, hi, device)
    single = {g: result.fits[g].weight.abs().argmax(1).cpu().numpy() for g in groups}
    out = {}
    for g, t in points:
        name = t.name
        constant = (hi[name] <= lo[name]).cpu().numpy()
        a_ids = a_top[name].ids.cpu().numpy()
        b_ids, b_vals = b_top[name].ids.cpu().numpy(), b_top[name].values.cpu().numpy()
        gt = GroupTopK(g, name, k, a_ids, a_top[name].values.cpu().numpy(), constant, single[g],
                       b_ids[single[g]], b_vals[single[g]], _recovered(a_ids, b_ids[single[g]], constant),
                       int(size[g][1]))
        for f, top in zip(chosen[g], maps_top[name]):
            ids = top.ids.cpu().numpy()
            r2_fit = (f.r2 if f.r2_fit is None else f.r2_fit).cpu().numpy()
            recovered = _recovered(a_ids, ids, constant)
            recovered[np.isnan(r2_fit)] = np.nan  # constant on the fitting subset: the fit says nothing (weights 0)
            gt.maps[f.label] = RegressedMap(f.label, f.m, f.fraction, f.refit, ids, top.values.cpu().numpy(),
                                            recovered, f.r2.cpu().numpy(), r2_fit)
        out[name] = gt
    return out


def _combine_ranks(a_top, b_top, maps_top, lo, hi, device):
    """The pass's accumulators combined over the ranks of a process group (one rank: unchanged)."""
    if world()[1] == 1:
        return a_top, b_top, maps_top, lo, hi
    names = list(a_top)
    tops = merge_over_ranks([a_top[n] for n in names] + [b_top[n] for n in names]
                            + [t for n in names for t in maps_top[n]], device)
    a_top, b_top = dict(zip(names, tops[: len(names)])), dict(zip(names, tops[len(names): 2 * len(names)]))
    rest = iter(tops[2 * len(names):])
    maps_top = {n: [next(rest) for _ in maps_top[n]] for n in names}
    # a rank without batches has no range: it lends +inf/-inf, which never win the min/max
    lo = {n: all_reduce(v if v is not None else torch.full((a_top[n].channels,), torch.inf, device=device), "min")
          for n, v in lo.items()}
    hi = {n: all_reduce(v if v is not None else torch.full((a_top[n].channels,), -torch.inf, device=device), "max")
          for n, v in hi.items()}
    return a_top, b_top, maps_top, lo, hi


def single_weight_fits(stats, fit: RegressionFit) -> list[RegressionFit]:
    """m = 1 maps (without and with refit) labelled "m=1" / "m=1 refit", from a group's statistics."""
    import dataclasses

    from .regression import sparsify

    return [dataclasses.replace(sparsify(stats, fit, 0.0, refit), fraction=0.0,
                                label="m=1" + (" refit" if refit else "")) for refit in (False, True)]


def summary_rows(tops: Mapping[str, GroupTopK]) -> list[dict]:
    """Per layer and map: mean held-out R² (``mean_r2``), mean in-sample R² (``mean_r2_fit``) and mean recovered
    fraction, each over the channels where it is defined."""
    rows = []
    for gt in tops.values():
        for mp in gt.maps.values():
            rows.append({"layer": gt.layer, "group": gt.group, "label": mp.label, "m": mp.m,
                         "fraction": mp.fraction, "refit": mp.refit, "mean_r2": _nanmean(mp.r2),
                         "mean_r2_fit": _nanmean(mp.r2_fit), "mean_recovered": _nanmean(mp.recovered)})
        rows.append({"layer": gt.layer, "group": gt.group, "label": "best single channel", "m": 1, "fraction": None,
                     "refit": None, "mean_r2": None, "mean_r2_fit": None,
                     "mean_recovered": _nanmean(gt.single_recovered)})
    return rows


def _nanmean(v: np.ndarray) -> float | None:
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else None


def pick(gt: GroupTopK, m: int, refit: bool = True) -> RegressedMap | None:
    """The map of a group with ``m`` weights per A channel and that refit flag (at m = C_B: the full fit)."""
    for mp in gt.maps.values():
        if mp.m == m and (mp.refit == refit or m == gt.channels_b):
            return mp
    return None


def hard_channels(gt: GroupTopK, fraction: float = 0.05, n: int = 10) -> list[dict]:
    """The A channels that need many weights: largest R²(all) − R²(``fraction``, refit), at most ``n``."""
    full, sparse = pick(gt, gt.channels_b), pick(gt, keep_count(fraction, gt.channels_b), refit=True)
    if full is None or sparse is None:
        return []
    gap = full.r2 - sparse.r2
    order = [int(i) for i in np.argsort(-np.nan_to_num(gap, nan=-np.inf)) if not np.isnan(gap[i])][:n]
    return [{"layer": gt.layer, "channel": c, "r2_all": float(full.r2[c]), "r2_sparse": float(sparse.r2[c]),
             "gap": float(gap[c]), "recovered_all": _f(full.recovered[c]), "recovered_sparse": _f(sparse.recovered[c])}
            for c in order]


def _f(v) -> float | None:
    return None if np.isnan(v) else float(v)


__all__ = ["GroupTopK", "RegressedMap", "hard_channels", "pick", "recovered_fraction", "regressed_activations",
           "regressed_topk", "single_weight_fits", "summary_rows"]
