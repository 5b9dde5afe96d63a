"""Streaming per-channel statistics in float64, mergeable across batches and distributed ranks.

Each batch is reduced to its own mean and centred second moments (accurate even in float32), and batches are
combined with Chan et al.'s parallel update, so the result does not depend on batch size or order beyond
floating-point rounding, and two partial results merge exactly like two batches.

The passes are memory-bound on a CPU (an early layer's statistics read more bytes than its convolution does
arithmetic), so every reduction here reads a batch as few times as it can and writes nothing batch-sized it does
not need: per-image fused sums (``sum``, ``vector_norm``) added in float64, the variance from Σx² − n·mean²
wherever that is as accurate as centring (:func:`_mean_m2`), cross products of the batches as they are, corrected by
the means (:func:`for_products`, under the same test), ``amin``/``amax`` rather than the slower ``aminmax``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .blocks import add_into, channel_view, per_image, products


def as_samples(t: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """(N, C, *spatial) or (..., C) -> (samples, C): every image × position is one sample."""
    return t.movedim(channel_dim, -1).reshape(-1, t.shape[channel_dim])


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half/bfloat16/integer activations are reduced in float32; float64 ones keep their precision."""
    return x if x.dtype == torch.float64 else x.float()


def common_precision(a: torch.Tensor, bs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``a`` and every ``b`` in the one precision their products are taken in: float64 if any of them is, else
    float32 (half, bfloat16 and integer activations converted; float32 ones as they are, no copy)."""
    a, bs = _at_least_float32(a), [_at_least_float32(b) for b in bs]
    if any(b.dtype != a.dtype for b in bs):
        a, bs = a.double(), [b.double() for b in bs]
    return a, bs


def _channel_sum(x3: torch.Tensor) -> torch.Tensor:
    """(A, C, S) -> (C,): the sum over samples, as one fused reduction per axis (no copy)."""
    return x3[:, :, 0].sum(0) if x3.shape[2] == 1 else x3.sum(2).sum(0)


def _channel_extreme(x3: torch.Tensor, reduce) -> torch.Tensor:
    """(A, C, S) -> (C,): ``torch.amin`` or ``torch.amax`` over samples, one fused reduction per axis. (Two of
    these read the batch twice and still cost a third to a quarter of one ``aminmax`` on CPU, measured.)"""
    return reduce(x3[:, :, 0], 0) if x3.shape[2] == 1 else reduce(reduce(x3, 2), 0)


def _sums(x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C,) float64 Σx and Σx² over the samples of an (A, C, S) batch, each one fused reduction that writes nothing
    batch-sized: per-image sums in x's precision (``vector_norm`` for the squares) added in float64; one value
    per image (S = 1) is squared in float64."""
    if x3.shape[2] == 1:
        v = x3[:, :, 0].double()
        return v.sum(0), v.square().sum(0)
    return sum64(x3), torch.linalg.vector_norm(x3, dim=2).double().square().sum(0)


def sum64(x3: torch.Tensor) -> torch.Tensor:
    """(C,) float64 Σx over the samples of an (A, C, S) batch: per-image sums in x's precision added in float64."""
    return x3[:, :, 0].double().sum(0) if x3.shape[2] == 1 else x3.sum(2).double().sum(0)


def _centred(d: torch.Tensor, centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C,) float64 mean and sum of squared deviations of the batch ``d`` + ``centre``, from ``d``, a batch centred
    on ``centre`` (its mean rounded to x's dtype, float64 (C,)), in one read of ``d``: mean = centre + Σd/n and
    m2 = Σd² − (Σd)²/n. Both are exact to the rounding of d's sums whatever the channels' offsets; the centre's own
    error (up to one float32 step of the mean, 0.06σ at a million σ) cancels out."""
    n = max(d.shape[0] * d.shape[2], 1)
    s, q = _sums(d)
    shift = s / n
    return centre + shift, q - s * shift


_ONE_READ = 4.0  # Σx² ≤ this × m2 (mean² ≤ 3 · variance): Σx² − n·mean² keeps float32 rounding (bench/RESULTS.md)
_ONE_READ_FLOAT64 = 2.0**20  # the same where Σx and Σx² are float64 throughout (one value per image, or float64
#                              input): cancellation then leaves ≥ 32 of float64's 53 bits, more than the 24 of
#                              float32 values centred first


def _mean_m2(x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's float64 per-channel mean and sum of squared deviations (C,), reading it twice and writing nothing
    batch-sized where that is as accurate as centring first: m2 = Σx² − n·mean², from float32 per-image sums, is
    used where Σx² ≤ :data:`_ONE_READ` · m2, so cancellation costs at most two bits of float32 rounding (measured
    ≤ 1.4e-7 relative against float64 for 3,025 positions per image, vs 1.7e-7 for centring then summing in
    float32), or Σx² ≤ :data:`_ONE_READ_FLOAT64` · m2 where the sums are float64 (:func:`_one_read`); the other
    channels — offset far from zero, constant, near-dead — are centred and summed again."""
    mean, m2, redo = _one_read(x3)
    if redo.numel():
        _recentre(x3, mean, m2, redo)
    return mean, m2


def _recentre(x3: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, redo: torch.Tensor,
              centred: torch.Tensor | None = None) -> None:
    """The float64 mean and m2 (C,) of the channels ``redo`` of an (A, C, S) batch, taken again in place from their
    values centred on the mean rounded to x's dtype (:func:`_centred`): from the whole centred batch where they are
    more than half the channels (``centred``, x3 minus that rounded mean, if the caller has it), else from a copy of
    those channels alone (e.g. ResNet20 with uncalibrated BatchNorm: 1–10 of 32–64 channels at its later stages)."""
    rounded = mean.to(x3.dtype)
    if 2 * redo.numel() > x3.shape[1]:
        exact_mean, exact_m2 = _centred(x3 - rounded.view(1, -1, 1) if centred is None else centred, rounded.double())
        mean[redo], m2[redo] = exact_mean[redo], exact_m2[redo]
    else:
        centre = rounded[redo]
        exact_mean, exact_m2 = _centred(x3.index_select(1, redo) - centre.view(1, -1, 1), centre.double())
        mean[redo], m2[redo] = exact_mean, exact_m2


def _minus_rounded_mean(x3: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An (A, C, S) batch centred on its float64 channel ``mean`` rounded to x's dtype, m̃ (one copy), and m̃ in float64
    — a copy of its own, so that refining ``mean`` in place afterwards (:func:`_recentre`) leaves the offset
    mean − m̃ of the copy's values as it should be, float64 input too (whose ``mean.to`` is ``mean`` itself)."""
    rounded = mean.to(x3.dtype, copy=True)
    return x3 - rounded.view(1, -1, 1), rounded.double()


def _one_read(x3: torch.Tensor, products: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch's float64 mean and Σx² − n·mean² per channel (C,), and the channels (indices) where that loses
    more to cancellation than centring first would (Σx² > limit · m2) and must be centred first: :func:`_tested`
    of its :func:`_sums`."""
    return _tested(x3, *_sums(x3), products)


def _tested(x3: torch.Tensor, s: torch.Tensor, q: torch.Tensor,
            products: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one-read test of a batch x3 with float64 sums Σx = ``s`` and Σx² = ``q`` (C,): its mean, m2 = Σx² − n·mean²
    and the channels (indices) with Σx² > limit · m2.

    The limit is :data:`_ONE_READ` where the per-image sums are taken in float32 and
    :data:`_ONE_READ_FLOAT64` where they are float64 (one position per image — a probe's or a linear layer's
    activations — or float64 input). ``products``: the test for cross products taken of the batch as it is, in
    its own precision (:func:`for_products`), which is float32's unless the batch is float64."""
    n = x3.shape[0] * x3.shape[2]
    mean = s / max(n, 1)
    m2 = q - s * mean
    wide = x3.dtype == torch.float64 or (x3.shape[2] == 1 and not products)
    limit = _ONE_READ_FLOAT64 if wide else _ONE_READ
    return mean, m2, (m2 * limit < q).nonzero().flatten()


def for_products(x3: torch.Tensor, by_image: bool, m2: bool = True):
    """A batch as its cross products read it: ``(values, mean, m2, offset)``, with values − offset the deviations
    from the float64 channel means (the products are corrected by −n·offset ⊗ offset afterwards); m2 (the sum of
    squared deviations, C,) is None when not asked for.

    Per image (``by_image``, :func:`mergescope.probe.blocks.per_image`: (images, C, positions)) or with one
    position per image ((samples, C)), the values are the batch itself, read in place, wherever every channel
    passes :func:`_one_read`'s test: Σ x yᵀ − n·m_x m_yᵀ then equals the centred products to within float32
    rounding of √(m2_x m2_y) times √(Σx²/m2_x · Σy²/m2_y) ≤ 4 (two bits, as for the variance), and nothing
    batch-sized is written. Otherwise they are the batch centred on its mean rounded to x's dtype, m̃ (one copy),
    offset mean − m̃, and the mean and m2 of the channels that failed are taken again from their centred values
    (:func:`_recentre`). The (samples, C) layout of several positions per image is always a copy, centred on the
    way."""
    c, pos = x3.shape[1], x3.shape[2]
    if by_image or pos == 1:
        mean, sq, redo = _one_read(x3, products=True)
        values, offset = x3, mean
        if redo.numel():
            values, rounded = _minus_rounded_mean(x3, mean)
            if m2:  # the failing channels' mean and m2 from their centred values; the others' are exact as they are
                _recentre(x3, mean, sq, redo, centred=values)
            offset = mean - rounded
        return (values if by_image else values[:, :, 0]), mean, (sq if m2 else None), offset
    if m2:
        mean, sq = _mean_m2(x3)
    else:
        mean, sq = sum64(x3) / max(x3.shape[0] * pos, 1), None
    rounded = mean.to(x3.dtype)
    out = torch.empty((x3.shape[0], pos, c), dtype=x3.dtype, device=x3.device)
    torch.sub(x3.transpose(1, 2), rounded, out=out)
    return out.view(-1, c), mean, sq, mean - rounded.double()


def with_own_products(x3: torch.Tensor, by_image: bool):
    """A batch as its products read it and its product with itself: ``(values, mean, offset, own)``, ``values``,
    ``mean`` and ``offset`` as :func:`for_products` gives them (without m2) and ``own`` = Σ values valuesᵀ
    (:func:`mergescope.probe.blocks.products`), for the joint scatter of the map merges.

    Per image or with one position per image, the one-read test (:func:`_tested`) takes Σx² from the diagonal of
    the batch's product with itself, which is needed anyway, rather than from a read of its own: the batch is read
    once for Σx and once by the product. Where a channel fails the test, the batch is centred on its mean rounded
    to x's dtype and the product taken again (never on the benchmarks' calibrated networks: bench/stat_functions.py).
    The (samples, C) layout of several positions per image is centred on the way, as in :func:`for_products`."""
    pos = x3.shape[2]
    if not (by_image or pos == 1):
        values, mean, _, offset = for_products(x3, by_image, m2=False)
        return values, mean, offset, products(values, values, by_image)
    values = x3 if by_image else x3[:, :, 0]
    own = products(values, values, by_image)
    mean, _, redo = _tested(x3, sum64(x3), own.diagonal().double(), products=True)
    if not redo.numel():
        return values, mean, mean, own
    centred, rounded = _minus_rounded_mean(x3, mean)
    values = centred if by_image else centred[:, :, 0]
    return values, mean, mean - rounded, products(values, values, by_image)


class Moments:
    """Per-channel count, mean and sum of squared deviations of a stream of (samples, C) batches."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None  # (C,) float64
        self.m2: torch.Tensor | None = None  # (C,) float64

    def update(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add a (samples, C) batch; returns the batch's own per-channel mean and (population) std."""
        return self.update_channels(x, -1)

    def update_channels(self, t: torch.Tensor, channel_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Add a batch in its own layout, e.g. (N, C, H, W) with ``channel_dim`` 1 (every image × position a
        sample), without reshaping it; returns the batch's own per-channel mean and (population) std."""
        x3 = channel_view(_at_least_float32(t), channel_dim)
        n = x3.shape[0] * x3.shape[2]
        mean, m2 = _mean_m2(x3)
        self._combine(n, mean, m2)
        return mean.to(x3.dtype), (m2 / max(n, 1)).sqrt().to(x3.dtype)

    def _combine(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean.to(self.mean.device) - self.mean
        self.m2 = self.m2 + m2.to(self.m2.device) + delta**2 * (self.n * n / total)
        self.mean = self.mean + delta * (n / total)
        self.n = total

    def merge(self, other: "Moments") -> None:
        if other.mean is not None:
            self._combine(other.n, other.mean, other.m2)

    def reindexed(self, order: torch.Tensor) -> "Moments":
        """The same moments with their channels re-indexed: channel ``c`` of the result is channel ``order[c]`` of
        these (the moments of a model whose channels were permuted by ``order``)."""
        out = Moments()
        if self.mean is not None:
            order = order.to(self.mean.device)
            out.n, out.mean, out.m2 = self.n, self.mean.index_select(0, order), self.m2.index_select(0, order)
        return out

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / max(self.n, 1)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()


class Extremes:
    """Per-channel minimum and maximum of a stream of (samples, C) batches, and how many samples equal each.

    Exact (no rounding) and independent of batching and order, so it merges like :class:`Moments`. Batches
    added with :meth:`update_channels` count only where a batch could be all but one equal (the counts of the
    other channels are 0, a lower bound that keeps :meth:`all_but_one_equal` exact), and a channel with two samples
    off each extreme in one batch is *settled*: no stream containing that batch is all but one equal there, so later
    batches are not read for it (after a ReLU network's first batch, only its dead channels are; none at all once
    every channel is settled), and its minimum, maximum and counts are no longer kept up to date.
    """

    def __init__(self) -> None:
        self.n = 0
        self.lo: torch.Tensor | None = None  # (C,) minimum
        self.hi: torch.Tensor | None = None  # (C,) maximum
        self.n_lo: torch.Tensor | None = None  # (C,) int64 samples equal to the minimum
        self.n_hi: torch.Tensor | None = None  # (C,) int64 samples equal to the maximum
        self.settled: torch.Tensor | None = None  # (C,) bool: proven not all but one equal
        self._open: torch.Tensor | None = None  # :attr:`open`, once asked for

    @property
    def open(self) -> torch.Tensor | None:
        """Indices of the channels not settled (None before the first batch): found when first asked for after an
        update (one device sync), and never again once empty, since channels only settle."""
        if self.settled is not None and self._open is None:
            self._open = (~self.settled).nonzero().flatten()
        return self._open

    def update(self, x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        lo, hi = x.min(0).values, x.max(0).values
        settled = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
        self._combine(x.shape[0], lo, (x == lo).sum(0), hi, (x == hi).sum(0), settled)

    def update_channels(self, x3: torch.Tensor, m2: torch.Tensor, channels: torch.Tensor | None = None) -> None:
        """Add an (A, C, S) batch (:func:`channel_view`) whose per-channel sum of squared deviations is ``m2``,
        reading it only for ``channels`` (indices; default: those this stream has not settled, all at first). The
        others must be settled already wherever this batch is added (:meth:`merge`).

        A channel whose samples all but one equal its minimum (or maximum) has m2 = R²·(n−1)/n, R its range
        (0 if constant); one with a larger m2 — beyond the rounding of m2 and R, bounded by a few ulps of the
        largest magnitude M per sample — has at least two samples off each extreme and is settled; only the others
        are counted (one small gathered copy).
        """
        n, c = x3.shape[0] * x3.shape[2], x3.shape[1]
        if n == 0:
            return
        if channels is None:
            channels = self.open
        if channels is not None and channels.numel() == 0 and self.lo is not None:
            self.n += n  # every channel settled: nothing to read
            return
        sub = x3 if channels is None or 2 * channels.numel() > c else x3.index_select(1, channels)
        lo, hi = _channel_extreme(sub, torch.amin), _channel_extreme(sub, torch.amax)
        if sub is x3 and channels is not None:
            lo, hi = lo[channels], hi[channels]
        if channels is not None:
            m2 = m2[channels.to(m2.device)]
        ulp = torch.finfo(x3.dtype).eps * torch.maximum(lo.abs(), hi.abs()).double()
        bound = (math.sqrt(1.01 * (n - 1) / n) * ((hi - lo).double() + 2 * ulp)
                 + math.sqrt(n) * (math.log2(n) + 4) * ulp)
        settled = m2.double().sqrt().to(bound.device) > bound
        n_lo = torch.zeros(lo.shape[0], dtype=torch.int64, device=x3.device)
        n_hi = n_lo.clone()
        maybe = (~settled).nonzero().flatten()
        if maybe.numel():
            read = maybe if channels is None else channels[maybe]
            part = x3.index_select(1, read)
            n_lo[maybe] = _channel_sum((part == lo[maybe].view(1, -1, 1)).to(torch.int64))
            n_hi[maybe] = _channel_sum((part == hi[maybe].view(1, -1, 1)).to(torch.int64))
        if channels is not None:  # the channels not read: settled, with values that leave a merge's untouched
            lo, hi, n_lo, n_hi, settled = (_scatter(channels, c, v, fill)
                                           for v, fill in ((lo, math.inf), (hi, -math.inf), (n_lo, 0), (n_hi, 0),
                                                           (settled, True)))
        self._combine(n, lo, n_lo, hi, n_hi, settled)

    def _combine(self, n: int, lo: torch.Tensor, n_lo: torch.Tensor, hi: torch.Tensor, n_hi: torch.Tensor,
                 settled: torch.Tensor) -> None:
        if self.lo is None:
            self.n, self.lo, self.n_lo, self.hi, self.n_hi, self.settled = n, lo, n_lo, hi, n_hi, settled
        else:
            self.lo, self.n_lo = _merge_extreme(self.lo, self.n_lo, lo, n_lo, torch.minimum)
            self.hi, self.n_hi = _merge_extreme(self.hi, self.n_hi, hi, n_hi, torch.maximum)
            self.settled = self.settled | settled.to(self.settled.device)
            self.n += n
        if self._open is not None and self._open.numel():
            self._open = None  # channels may have settled

    def merge(self, other: "Extremes") -> None:
        if other.lo is not None:
            self._combine(other.n, other.lo, other.n_lo, other.hi, other.n_hi, other.settled)

    def all_but_one_equal(self) -> torch.Tensor:
        """Boolean (C,): channels that take one value on every sample except at most one."""
        return ~self.settled & ((self.n_lo >= self.n - 1) | (self.n_hi >= self.n - 1))


def _scatter(index: torch.Tensor, size: int, values: torch.Tensor, fill) -> torch.Tensor:
    out = torch.full((size,), fill, dtype=values.dtype, device=values.device)
    return out.index_copy_(0, index.to(values.device), values)


def _open_channels(streams: Sequence[Extremes]) -> torch.Tensor | None:
    """The channels any of ``streams`` has not settled, as indices; None (all) if one has seen nothing."""
    if any(e.open is None for e in streams):
        return None
    if len(streams) == 1:
        return streams[0].open
    return torch.cat([e.open for e in streams]).unique()


def co_update(stats: Sequence[CoMoments], a: torch.Tensor, bs: Sequence[torch.Tensor],
              channel_dim: int = 1) -> None:
    """Add one batch to ``stats[k]`` ← (``a``, ``bs[k]``): A's moments and extremes are computed once for every
    model, then each model's own and its cross products with A — of the batches as they are, corrected by the
    means afterwards, wherever that is as accurate as centring them (:func:`for_products`)."""
    a, bs = common_precision(a, bs)
    a3, b3s = channel_view(a, channel_dim), [channel_view(b, channel_dim) for b in bs]
    n = a3.shape[0] * a3.shape[2]
    by_image = per_image(a3, b3s)
    xa, ma, m2a, ua = for_products(a3, by_image)
    ext_a = Extremes()  # A's batch once, for the channels any of its streams has not settled
    ext_a.update_channels(a3, m2a, _open_channels([st.ext_a for st in stats]))
    for st, b3 in zip(stats, b3s):
        xb, mb, m2b, ub = for_products(b3, by_image)
        st._combine(n, ma, mb, products(xa, xb, by_image), offsets=(ua, ub))
        st.a._combine(n, ma, m2a)
        st.b._combine(n, mb, m2b)
        st.ext_a.merge(ext_a)
        st.ext_b.update_channels(b3, m2b)


def _merge_extreme(v1, c1, v2, c2, pick):
    v2, c2 = v2.to(v1.device), c2.to(c1.device)
    v = pick(v1, v2)
    return v, c1 * (v1 == v) + c2 * (v2 == v)


class CoMoments:
    """Means, variances and the cross-covariance of two aligned streams a (samples, Ca) and b (samples, Cb)."""

    def __init__(self) -> None:
        self.a, self.b = Moments(), Moments()
        self.cab: torch.Tensor | None = None  # (Ca, Cb) float64 sum of co-deviations
        self.ext_a, self.ext_b = Extremes(), Extremes()  # for :meth:`dead`

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add a batch of (samples, Ca) and (samples, Cb), row i of both from the same sample."""
        self.update_channels(a, b, -1)

    def update_channels(self, a: torch.Tensor, b: torch.Tensor, channel_dim: int = 1) -> None:
        """Add a batch in its own layout (e.g. (N, C, H, W), ``channel_dim`` 1), without reshaping it: each
        batch's moments are computed once per side (:func:`co_update` with one b)."""
        co_update([self], a, [b], channel_dim)

    def _combine(self, n: int, ma: torch.Tensor, mb: torch.Tensor, cab: torch.Tensor,
                 offsets: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Chan et al.'s update with a batch's Σ (a − ma)(b − mb)ᵀ, or, given ``offsets`` (ua, ub), its products of
        deviations offset by them, Σ (a − ma + ua)(b − mb + ub)ᵀ (uncentred: ua = ma), corrected here by
        −n·ua ubᵀ — both rank-one terms one update of the float64 sum."""
        left, right = [], []
        if offsets is not None:
            left.append(offsets[0].to(torch.float64))
            right.append(offsets[1].to(torch.float64) * -n)
        if self.cab is None:
            self.cab = cab.to(torch.float64)
        else:
            n0 = self.a.n
            left.append(ma.to(self.a.mean.device) - self.a.mean)
            right.append((mb.to(self.b.mean.device) - self.b.mean) * (n0 * n / (n0 + n)))
            # in place, float32 products added in float64 without a float64 copy of them: a (Ca, Cb) float64 sum
            # is the largest buffer of a pass
            add_into(self.cab, cab)
        if left:
            dev = self.cab.device
            self.cab.addmm_(torch.stack(left, 1).to(dev), torch.stack(right, 0).to(dev))

    def merge(self, other: "CoMoments") -> None:
        if other.cab is not None:
            cab = other.cab if self.cab is not None else other.cab.clone()  # self.cab is updated in place
            self._combine(other.a.n, other.a.mean, other.b.mean, cab)
            self.a.merge(other.a)
            self.b.merge(other.b)
            self.ext_a.merge(other.ext_a)
            self.ext_b.merge(other.ext_b)

    def correlation(self, eps: float = 1e-12) -> torch.Tensor:
        """Pearson correlation (Ca, Cb); entries involving a constant channel are 0 (see :meth:`dead`)."""
        sa, sb = self.a.m2.sqrt(), self.b.m2.sqrt()
        denom = torch.outer(sa, sb)
        return torch.where(denom > eps, self.cab / denom.clamp_min(eps), torch.zeros_like(denom))

    def dead(self, rel_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks of channels (of a, of b) whose correlations carry no information.

        That is a channel constant over every sample seen, or constant on all samples but one (e.g. a ReLU
        unit that fires on a single image × position): such a channel is an affine function of that sample's
        indicator, so its correlation with any other channel only says how extreme that channel is on the one
        sample, and every channel firing only there correlates with it perfectly (ties).
        """
        def mask(m: Moments, e: Extremes) -> torch.Tensor:
            scale = m.mean.abs().clamp_min(1.0)
            return (m.std <= rel_eps * scale) | e.all_but_one_equal().to(m.std.device)
        return mask(self.a, self.ext_a), mask(self.b, self.ext_b)
