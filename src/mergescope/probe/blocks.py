"""Second-moment products of float32 activations, summed in float64, and batches gathered before they are added.

Shared by matching's :class:`~mergescope.probe.stats.CoMoments` and the map merges'
:class:`~mergescope.align.covariance.JointMoments`. A batch's cross products are float32 matrix products — of
each image's positions, summed over a chunk of images, or of at most :data:`ROWS` rows of the (samples, C)
layout — whose partial sums are added in float64, so the rounding is that of float32 sums of a few thousand
terms whatever the batch size. Batches of few positions per channel (the (samples, C) layout: linear layers,
small late maps) are held back by :class:`Gathered` and added as one group, so that a wide layer's float64
(C, C) accumulator (16.7 M entries for a 4,096-unit layer) is updated once per group instead of once per batch:
that update, not the product, is what costs on a CPU (memory-bound, measured: bench/RESULTS.md).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import math

import torch

ROWS = 1024  # samples per float32 product before the sum moves to float64
GROUP = 8192  # samples of (samples, C)-layout batches held back and added as one (:class:`Gathered`)
BLOCK = 1 << 24  # elements of a per-image product chunk, and of a held group per tensor (64 MB in float32)
CAST = 1 << 18  # values converted to float64 at a time by :func:`add_into` (2 MB: a float64 buffer in cache)


def channel_view(t: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """(N, C, *spatial) or (..., C) -> (before, C, after), a view of a contiguous tensor (no copy): the samples
    are every (before, after) pair, i.e. every image × position, in the order
    :func:`mergescope.probe.stats.as_samples` gives them per image."""
    d = channel_dim % t.dim()
    return t.reshape(math.prod(t.shape[:d]), t.shape[d], math.prod(t.shape[d + 1:]))


def products(x: torch.Tensor, y: torch.Tensor, per_image: bool) -> torch.Tensor:
    """``Σ_samples x yᵀ`` (Cx, Cy) of two centred batches — (images, C, positions) if ``per_image``, else
    (samples, C) — as float32 (or float64, for float64 input) products of each image's positions summed over a
    chunk of ≤ :data:`BLOCK` output values, or of ≤ :data:`ROWS` rows, the parts summed in float64 (a single
    part is returned as it is: the caller adds it into float64)."""
    if per_image:
        step = max(1, BLOCK // (x.shape[1] * y.shape[1] or 1))
        parts = [torch.bmm(x[i:i + step], y[i:i + step].transpose(1, 2)).sum(0) for i in range(0, len(x), step)]
    else:
        parts = [x[i:i + ROWS].T @ y[i:i + ROWS] for i in range(0, len(x), ROWS)]
    if len(parts) == 1:
        return parts[0]
    channels = (x.shape[-2], y.shape[-2]) if per_image else (x.shape[1], y.shape[1])
    out = torch.zeros(channels, dtype=torch.float64, device=x.device)  # no parts (no samples): zeros
    for part in parts:
        add_into(out, part)
    return out


def add_into(total: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """``total += part`` in place, ``part`` float32 or float64, ``total`` float64 (e.g. a (C, C) sum of products).

    On a CPU, an add of float32 into float64 casts element by element (4× slower than a float64 add, measured on
    4,096²: 75 ms against 18 ms, bench/RESULTS.md); here the rows are converted in slices of ≤ :data:`CAST`
    values into one small float64 buffer that stays in cache, and added from there. Elsewhere (CUDA), or when
    the dtypes agree, it is one ``add_``."""
    part = part.to(total.device)
    if part.dtype == total.dtype or total.device.type != "cpu" or total.dim() != 2 or part.numel() <= CAST:
        return total.add_(part)
    rows = max(1, CAST // max(total.shape[1], 1))
    buffer = torch.empty((rows, total.shape[1]), dtype=total.dtype)
    for i in range(0, total.shape[0], rows):
        chunk = buffer[: min(rows, total.shape[0] - i)]
        total[i:i + rows].add_(chunk.copy_(part[i:i + rows]))
    return total


def per_image(a3: torch.Tensor, b3s: Sequence[torch.Tensor]) -> bool:
    """Whether a batch of (images, C, positions) views is reduced image by image (more positions than the
    channels of A and any B together: a tall-skinny product is slow) rather than in its (samples, C) layout."""
    return a3.shape[2] >= a3.shape[1] + max(b3.shape[1] for b3 in b3s)


Update = Callable[[Sequence, torch.Tensor, Sequence[torch.Tensor], int], None]


class Gathered:
    """Batches in the (samples, C) layout held back per key and given to ``update(stats, a, bs, 1)`` as one
    batch of ≤ :data:`GROUP` samples (≤ :data:`BLOCK` values per tensor); per-image batches (:func:`per_image`)
    go straight through. :meth:`flush` adds what is held (call it once, after the pass's last batch).

    ``update`` must give the same statistics for one batch as for its parts (up to rounding): the streamed
    moments here are batch-size independent by construction (Chan et al.'s update).
    """

    def __init__(self, update: Update) -> None:
        self.update = update
        self._held: dict = {}  # key -> (stats, [(a, [b, ...]), ...] as (images, C, positions) views, samples)

    def add(self, key, stats: Sequence, a: torch.Tensor, bs: Sequence[torch.Tensor], channel_dim: int) -> None:
        a3, b3s = channel_view(a, channel_dim), [channel_view(b, channel_dim) for b in bs]
        if per_image(a3, b3s):  # nothing to gain
            self.update(stats, a3, b3s, 1)
            return
        _, parts, rows = self._held.get(key, (stats, [], 0))
        parts.append((a3, b3s))
        rows += a3.shape[0] * a3.shape[2]
        self._held[key] = (stats, parts, rows)
        if rows >= GROUP or rows * max(a3.shape[1], *(b3.shape[1] for b3 in b3s)) >= BLOCK:
            self._add(key)

    def _add(self, key) -> None:
        stats, parts, _ = self._held.pop(key)
        a = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        bs = [torch.cat([p[1][k] for p in parts]) if len(parts) > 1 else parts[0][1][k]
              for k in range(len(parts[0][1]))]
        self.update(stats, a, bs, 1)  # the (images, C, positions) views: channels on axis 1

    def flush(self) -> None:
        for key in list(self._held):
            self._add(key)
