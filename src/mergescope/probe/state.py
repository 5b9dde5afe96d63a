"""The accumulators of one probe pass (or one shard of it): top-k, moments and subset activations per layer.

Each batch arrives as one activation per (image, channel) for every layer of every model (see
:mod:`mergescope.probe.reduce`) and is fed to every accumulator at once. Memory is
O(models · channels · (k + |D'|)), never O(dataset).

The D' activations are accumulated in float32 and kept in the results in 16 bits (:func:`compact_subset`); top-k
values stay float32 and the moments float64.
"""
from __future__ import annotations

import torch

from ..errors import NumericsError
from ..timing import stage
from .result import LayerProbe
from .stats import Moments
from .topk import StreamingTopK

LayerShapes = dict[str, dict[str, tuple[int, int]]]  # model -> layer -> (channels, channel_dim)
SUBSET_DTYPE = torch.float16  # D' as kept: bench/subset_precision.py measured its effect on Kendall's τ against
#                               float32 and bfloat16 (bench/RESULTS.md, 2026-12-02)
_FLOAT16_MAX = torch.finfo(torch.float16).max


def compact_subset(x: torch.Tensor) -> torch.Tensor:
    """One layer's D' activations [|D'|, C] as kept: float16 (relative rounding error at most 2^-11 — coarser for
    subnormal values below 6.1e-5 —; two values less than one float16 step, ~0.1%, apart may become a tie for
    Kendall's τ), or bfloat16 when a value is beyond float16's range (65,504)."""
    big = x.numel() > 0 and float(x.abs().max()) > _FLOAT16_MAX
    return x.to(torch.bfloat16 if big else SUBSET_DTYPE)



class SubsetIndex:
    """Finds the rows of a fixed image subset D' among a batch's ids in O(|D'|) memory (sorted search)."""

    def __init__(self, subset_ids: torch.Tensor):
        self.size = int(subset_ids.numel())
        self.sorted, self.order = subset_ids.sort()  # [S], [S]

    def locate(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions in the batch, rows of D') of the batch's ids that belong to D'."""
        if self.size == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, empty
        idx = torch.searchsorted(self.sorted, ids).clamp_max(self.size - 1)  # [B]
        hit = self.sorted[idx] == ids  # [B]
        return hit.nonzero().squeeze(1), self.order[idx[hit]]


class ProbeState:
    """Per (model, layer): the top-k, moments and D' activations, held for all layers of all models at once.

    Every batch's reduced activations are laid side by side as one [B, ΣC] matrix (one copy of B·ΣC floats, small
    next to the feature maps they were reduced from) and each accumulator is one :class:`StreamingTopK`, one
    :class:`Moments` and one [|D'|, ΣC] matrix over all those columns: a batch costs a fixed ~15 tensor operations
    however many models and layers are probed, instead of as many per layer (measured on 5 ResNet20s × 19 layers:
    ~40 ms → see bench/RESULTS.md). Every statistic is per column, so this is the same computation as one
    accumulator per layer; :meth:`layer_probes` cuts the columns apart again.
    """

    def __init__(self, shapes: LayerShapes, k: int, subset_ids: torch.Tensor | None,
                 device: torch.device | str = "cpu"):
        self.shapes, self.k, self.device = shapes, k, torch.device(device)
        self.sync = self.device if self.device.type == "cuda" else None  # what the top-k stage waits for
        self.keys = [(m, layer) for m, layers in shapes.items() for layer in layers]
        self.sizes = [shapes[m][layer][0] for m, layer in self.keys]  # columns of each (model, layer)
        self.topk = StreamingTopK(sum(self.sizes), k, self.device, "the probe")
        self.moments = Moments()
        self.subset_ids = subset_ids
        self.index = SubsetIndex(subset_ids) if subset_ids is not None else None
        self.subset = None if subset_ids is None else torch.zeros(len(subset_ids), sum(self.sizes),
                                                                   device=self.device)  # [S, ΣC]
        self.batches_done = 0  # position in the (deterministic) batch sequence
        self.images_seen = 0

    def update(self, ids: torch.Tensor, activations: dict[str, dict[str, torch.Tensor]]) -> None:
        """Absorb one batch: ``ids`` int64 [B] (CPU) and, per model and layer, the reduced activations [B, C]."""
        flat = torch.cat([activations[m][layer] for m, layer in self.keys], dim=1)  # [B, ΣC]
        batch_mean, _ = self.moments.update(flat)
        if not bool(torch.isfinite(batch_mean).all()):  # NaN/Inf anywhere reaches its column's mean; one sync
            self._raise_not_finite(ids, flat)
        with stage("top-k", self.sync):
            self.topk.update(flat, ids, check=False)
        if self.index is not None:
            pos, rows = self.index.locate(ids)
            if pos.numel():
                self.subset[rows.to(self.device)] = flat[pos.to(self.device)]
        self.batches_done += 1
        self.images_seen += int(ids.numel())

    def _raise_not_finite(self, ids: torch.Tensor, flat: torch.Tensor) -> None:
        bad = (~torch.isfinite(flat)).any(0)  # [ΣC]
        first = int(torch.stack([part.any() for part in bad.split(self.sizes)]).nonzero()[0])
        m, layer = self.keys[first]
        raise NumericsError(f"NaN/Inf activations in model '{m}', layer '{layer}' "
                            f"(batch of image ids {int(ids[0])}..{int(ids[-1])})")

    def layer_probes(self) -> dict[str, dict[str, LayerProbe]]:
        """The current state as results (CPU tensors), one per model and layer."""
        values, ids = (t.cpu().split(self.sizes) for t in (self.topk.values, self.topk.ids))
        mom = self.moments
        means, m2s = ((t.cpu().split(self.sizes) for t in (mom.mean, mom.m2)) if mom.mean is not None
                      else ([None] * len(self.keys),) * 2)
        subsets = ([compact_subset(part).cpu().float() for part in self.subset.split(self.sizes, dim=1)]
                   if self.subset is not None else [None] * len(self.keys))  # 16-bit values, chosen per layer
        out: dict[str, dict[str, LayerProbe]] = {m: {} for m in self.shapes}
        for i, (m, layer) in enumerate(self.keys):
            moments = Moments()
            if means[i] is not None:
                moments.n, moments.mean, moments.m2 = mom.n, means[i].clone(), m2s[i].clone()
            out[m][layer] = LayerProbe(values[i].clone(), ids[i].clone(), moments, subsets[i])
        return out

    def restore(self, probes: dict[str, dict[str, LayerProbe]], batches_done: int, images_seen: int) -> None:
        """Continue from saved results (a checkpoint of this same pass)."""
        layers = [probes[m][layer] for m, layer in self.keys]
        self.topk = StreamingTopK.from_arrays(torch.cat([p.topk_values for p in layers]),
                                              torch.cat([p.topk_ids for p in layers]), self.k, images_seen,
                                              self.topk.name, self.device)
        self.moments = Moments()
        if layers[0].moments.mean is not None:
            self.moments.n = layers[0].moments.n
            self.moments.mean = torch.cat([p.moments.mean for p in layers]).to(self.device)
            self.moments.m2 = torch.cat([p.moments.m2 for p in layers]).to(self.device)
        if self.subset is not None:
            self.subset = torch.cat([p.subset for p in layers], dim=1).to(self.device)
        self.batches_done, self.images_seen = batches_done, images_seen
