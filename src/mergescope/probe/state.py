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
    """Per (model, layer): a :class:`StreamingTopK`, a :class:`Moments` and the D' activation matrix."""

    def __init__(self, shapes: LayerShapes, k: int, subset_ids: torch.Tensor | None,
                 device: torch.device | str = "cpu"):
        self.shapes, self.k, self.device = shapes, k, torch.device(device)
        self.sync = self.device if self.device.type == "cuda" else None  # what the top-k stage waits for
        self.keys = [(m, layer) for m, layers in shapes.items() for layer in layers]
        self.topk = {(m, layer): StreamingTopK(shapes[m][layer][0], k, self.device, f"model '{m}', layer '{layer}'")
                     for m, layer in self.keys}
        self.moments = {key: Moments() for key in self.keys}
        self.subset_ids = subset_ids
        self.index = SubsetIndex(subset_ids) if subset_ids is not None else None
        self.subset = {} if subset_ids is None else {
            (m, layer): torch.zeros(len(subset_ids), shapes[m][layer][0], device=self.device)  # [S, C]
            for m, layer in self.keys
        }
        self.batches_done = 0  # position in the (deterministic) batch sequence
        self.images_seen = 0

    def update(self, ids: torch.Tensor, activations: dict[str, dict[str, torch.Tensor]]) -> None:
        """Absorb one batch: ``ids`` int64 [B] (CPU) and, per model and layer, the reduced activations [B, C]."""
        reduced = {(m, layer): activations[m][layer] for m, layer in self.keys}  # each [B, C]
        finite = torch.stack([torch.isfinite(r).all() for r in reduced.values()])  # one sync per batch
        if not bool(finite.all()):
            m, layer = self.keys[int((~finite).nonzero()[0])]
            raise NumericsError(f"NaN/Inf activations in model '{m}', layer '{layer}' "
                                f"(batch of image ids {int(ids[0])}..{int(ids[-1])})")
        pos = rows = None
        if self.index is not None:
            pos, rows = self.index.locate(ids)
            pos, rows = pos.to(self.device), rows.to(self.device)
        with stage("top-k", self.sync):  # every layer's at once: one device sync per batch on CUDA
            for key, r in reduced.items():
                self.topk[key].update(r, ids, check=False)
        for key, r in reduced.items():
            self.moments[key].update(r)
            if pos is not None and pos.numel():
                self.subset[key][rows] = r[pos]
        self.batches_done += 1
        self.images_seen += int(ids.numel())

    def layer_probes(self) -> dict[str, dict[str, LayerProbe]]:
        """The current state as results (CPU tensors)."""
        out: dict[str, dict[str, LayerProbe]] = {m: {} for m in self.shapes}
        for m, layer in self.keys:
            topk, mom = self.topk[m, layer], self.moments[m, layer]
            moments = Moments()
            if mom.mean is not None:
                moments.n, moments.mean, moments.m2 = mom.n, mom.mean.cpu(), mom.m2.cpu()
            subset = compact_subset(self.subset[m, layer]).cpu().float() if self.subset else None  # 16-bit values
            out[m][layer] = LayerProbe(topk.values.cpu(), topk.ids.cpu(), moments, subset)
        return out

    def restore(self, probes: dict[str, dict[str, LayerProbe]], batches_done: int, images_seen: int) -> None:
        """Continue from saved results (a checkpoint of this same pass)."""
        for m, layer in self.keys:
            p = probes[m][layer]
            self.topk[m, layer] = StreamingTopK.from_arrays(p.topk_values, p.topk_ids, self.k, images_seen,
                                                            self.topk[m, layer].name, self.device)
            mom = Moments()
            if p.moments.mean is not None:
                mom.n, mom.mean, mom.m2 = p.moments.n, p.moments.mean.to(self.device), p.moments.m2.to(self.device)
            self.moments[m, layer] = mom
            if self.subset:
                self.subset[m, layer] = p.subset.to(self.device).clone()
        self.batches_done, self.images_seen = batches_done, images_seen
