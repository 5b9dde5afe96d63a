"""Second-moment products of float32 activations, summed in float64, and batches gathered before they are added.

Shared by matching's :class:`~mergescope.probe.stats.CoMoments` and the map merges'
:class:`~mergescope.align.covariance.JointMoments`. A batch's cross products are float32 matrix products — of
each image's positions, summed over a chunk of images, or of at most :data:`ROWS` samples of one image or of
the (samples, C) layout — whose partial sums are added in float64, so the rounding is that of float32 sums of a
few thousand terms whatever the batch size. Batches of few positions per channel (linear layers, small late maps) are held
back by :class:`Gathered` and added as one group, so that a wide layer's float64 (C, C) accumulator (16.7 M
entries for a 4,096-unit layer) is updated once per group instead of once per batch: that update, not the
product, is what costs on a CPU (memory-bound, measured: bench/RESULTS.md). The held batches are copied into
buffers kept for the whole pass, a map's channel-major, so that neither a concatenation nor a transposed copy
is made and no fresh memory is touched per group (both cost more than the products on a CPU, measured).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import math

import torch

ROWS = 8192  # samples per float32 product before the sum moves to float64
GROUP = 8192  # samples of batches held back and added as one (:class:`Gathered`)
BLOCK = 1 << 24  # elements of a per-image product chunk, and of a held group per tensor (64 MB in float32)
CAST = 1 << 18  # values converted to float64 at a time by :func:`add_into` (2 MB: a float64 buffer in cache)
SLAB = 96  # channels per row slab, at least, of a batch's product with itself (:func:`products`)


def channel_view(t: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """(N, C, *spatial) or (..., C) -> (before, C, after), a view of a contiguous tensor (no copy): the samples
    are every (before, after) pair, i.e. every image × position, in the order
    :func:`mergescope.probe.stats.as_samples` gives them per image."""
    d = channel_dim % t.dim()
    return t.reshape(math.prod(t.shape[:d]), t.shape[d], math.prod(t.shape[d + 1:]))


def products(x: torch.Tensor, y: torch.Tensor, per_image: bool) -> torch.Tensor:
    """``Σ_samples x yᵀ`` (Cx, Cy) of two centred batches — (images, C, positions) if ``per_image``, else
    (samples, C) — as float32 (or float64, for float64 input) matrix products, their parts summed in float64 (a
    single part is returned as it is: the caller adds it into float64).

    Several images per image: each image's positions, summed over a chunk of images of ≤ :data:`BLOCK` output
    values. One image (e.g. a group held by :class:`Gathered`, channel-major) or the (samples, C) layout: equal
    chunks of ≤ :data:`ROWS` samples, the float32 sums of a few thousand terms. A batch with itself (``y is x``)
    is symmetric: only the blocks of its row slabs on and above the diagonal are multiplied — k slabs of
    ≥ :data:`SLAB` channels (k ≤ 8) cost (k + 1)/2k of the whole product — and those below are their transposes
    (measured 1.2–1.9× faster than one product from 192 to 4,096 channels: bench/RESULTS.md)."""
    if per_image and len(x) != 1:
        step = max(1, BLOCK // (x.shape[1] * y.shape[1] or 1))
        spans = [slice(i, i + step) for i in range(0, len(x), step)]

        def part(span, rows, cols):
            return torch.bmm(x[span, rows], y[span, cols].transpose(1, 2)).sum(0)
    else:
        xm, ym = (x[0], y[0]) if per_image else (x.T, y.T)  # (C, samples) views
        step = max(1, -(-xm.shape[1] // max(1, -(-xm.shape[1] // ROWS))))  # equal chunks of ≤ ROWS
        spans = [slice(i, i + step) for i in range(0, xm.shape[1], step)]

        def part(span, rows, cols):
            return xm[rows, span] @ ym[cols, span].T
    cx, cy = x.shape[1], y.shape[1]
    every = slice(None)
    if y is not x:
        if len(spans) == 1:
            return part(spans[0], every, every)
        slabs = [(every, every)]
    else:
        size = -(-cx // max(1, min(8, cx // SLAB)))
        slabs = [(slice(p, p + size), slice(p, None)) for p in range(0, cx, size)]
    if len(spans) == 1:
        out = torch.empty((cx, cy), dtype=x.dtype, device=x.device)
        for rows, cols in slabs:
            out[rows, cols] = part(spans[0], rows, cols)
    else:
        out = torch.zeros((cx, cy), dtype=torch.float64, device=x.device)  # no samples: zeros
        for span in spans:
            for rows, cols in slabs:
                add_into(out[rows, cols], part(span, rows, cols))
    if y is x:
        for rows, cols in slabs[:-1]:  # the blocks below the diagonal: transposes of those above
            out[rows.stop:, rows] = out[rows, rows.stop:].T
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


def tall(a3: torch.Tensor, b3s: Sequence[torch.Tensor]) -> bool:
    """Whether an (images, C, positions) batch has more positions per image than the channels of A and any B
    together: its per-image products are then efficient as they are, and nothing is gained by holding it back."""
    return a3.shape[2] >= a3.shape[1] + max(b3.shape[1] for b3 in b3s)


def per_image(a3: torch.Tensor, b3s: Sequence[torch.Tensor]) -> bool:
    """Whether a batch of (images, C, positions) views is reduced image by image rather than in its (samples, C)
    layout: a :func:`tall` batch (a tall-skinny product is slow), or one image of several positions — e.g. a
    group in :class:`Gathered`'s channel-major layout — whose (samples, C) layout would only be a transposed copy
    of it."""
    return (a3.shape[0] == 1 and a3.shape[2] > 1) or tall(a3, b3s)


Update = Callable[[Sequence, torch.Tensor, Sequence[torch.Tensor], int], None]


class _Held:
    """One key's held samples: a buffer per tensor (A's, then each B's), written as the batches come and reused
    from group to group, so a pass allocates (and first touches) it once.

    Several positions per image: channel-major, (C, samples) — every batch copied in as runs of its images'
    positions, which a copy reads and writes in order — and given to the update as one image (1, C, samples),
    whose products are the same float32 matrix products of ≤ :data:`ROWS` samples. One position per image (a
    linear layer): (samples, C, 1), its rows as they are."""

    def __init__(self, stats: Sequence, tensors: Sequence[torch.Tensor], capacity: int) -> None:
        self.stats, self.rows, self.positions = stats, 0, tensors[0].shape[2]
        self.buffers = [t.new_empty((t.shape[1], capacity) if self.positions > 1 else (capacity, t.shape[1], 1))
                        for t in tensors]

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[1 if self.positions > 1 else 0]

    def fits(self, tensors: Sequence[torch.Tensor]) -> bool:
        return (tensors[0].shape[2] == self.positions and self.rows + samples(tensors[0]) <= self.capacity
                and all(t.shape[1] == buf.shape[0 if self.positions > 1 else 1] and t.dtype == buf.dtype
                        for t, buf in zip(tensors, self.buffers)))

    def append(self, tensors: Sequence[torch.Tensor]) -> None:
        n = samples(tensors[0])
        for t, buf in zip(tensors, self.buffers):
            if self.positions > 1:  # (images, C, P) -> the columns (C, images × P), P values at a time
                buf[:, self.rows:self.rows + n].view(t.shape[1], t.shape[0], t.shape[2]).copy_(t.transpose(0, 1))
            else:
                buf[self.rows:self.rows + n].copy_(t)
        self.rows += n

    def taken(self) -> list[torch.Tensor]:
        """The held samples as the update reads them ((1, C, samples) or (samples, C, 1) views), and empty."""
        rows, self.rows = self.rows, 0
        if self.positions > 1:
            return [buf[:, :rows].unsqueeze(0) for buf in self.buffers]
        return [buf[:rows] for buf in self.buffers]


def samples(t3: torch.Tensor) -> int:
    """Images × positions of an (images, C, positions) batch."""
    return t3.shape[0] * t3.shape[2]


class Gathered:
    """Batches that are not :func:`tall` held back per key and given to ``update(stats, a, bs, 1)`` as one batch
    of ≤ :data:`GROUP` samples (≤ :data:`BLOCK` values per tensor; a larger batch alone), as many batches as fit
    — copied into buffers kept for the whole pass
    (:class:`_Held`), in the layout whose products read them as they are; tall batches go straight through.
    :meth:`flush` adds what is held and frees the buffers (call it once, after the pass's last batch).

    ``update`` must give the same statistics for one batch as for its parts (up to rounding): the streamed
    moments here are batch-size independent by construction (Chan et al.'s update).
    """

    def __init__(self, update: Update) -> None:
        self.update = update
        self._held: dict = {}  # key -> _Held

    def add(self, key, stats: Sequence, a: torch.Tensor, bs: Sequence[torch.Tensor], channel_dim: int) -> None:
        tensors = [channel_view(t, channel_dim) for t in (a, *bs)]
        if tall(tensors[0], tensors[1:]):  # nothing to gain
            self.update(stats, tensors[0], tensors[1:], 1)
            return
        n, widest = samples(tensors[0]), max(t.shape[1] for t in tensors)
        limit = max(1, min(GROUP, BLOCK // widest))  # samples per group (a larger batch is a group of its own)
        held = self._held.get(key)
        if held is not None and not held.fits(tensors):
            self._add(held)
            if not held.fits(tensors):  # a larger batch, or another layout: buffers of its own
                held = None
        if held is None:
            held = self._held[key] = _Held(stats, tensors, max(limit, n))
        held.append(tensors)
        if held.rows + n > limit:  # another batch like this one would not fit: added now
            self._add(held)

    def _add(self, held: _Held) -> None:
        if held.rows:
            a, *bs = held.taken()
            self.update(held.stats, a, bs, 1)  # channels on axis 1

    def flush(self) -> None:
        for held in self._held.values():
            self._add(held)
        self._held = {}
