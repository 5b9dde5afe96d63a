"""The joint covariance of two models' features per permutation group, streamed in one pass.

Regression alignment, CCA merging, OT fusion and ZipIt! all start from the same second-order statistics of the
concatenated features ``[a; b]`` of a group (A's channels, then B's): the means and the full centred scatter
matrix, whose blocks are Σ_AA, Σ_BB and Σ_AB. :class:`JointMoments` accumulates them in float64 with Chan et
al.'s parallel update, like :class:`mergescope.probe.stats.CoMoments`: each batch's blocks are float32 products of
a few thousand samples summed in float64 (:func:`update_shared`), so the statistics agree with a float64
computation to float32 rounding (~1e-7 of the largest variance; float64 input stays float64). Memory is
O(channels²), never O(samples), and batching changes the result only by that rounding. Every image × position
is one sample.
A residual stream is measured where REPAIR's reference measures it for matching — its stage's last block output
(``points="stage_end"``, :func:`mergescope.perm.observation_points`); ``points="all"`` pools the samples of every
place it is observed (stem activation and every block output). Inside a ``torch.distributed`` process group
each rank walks its share of the batches and the moments are merged over the ranks
(:mod:`mergescope.distributed`): every rank gets the one-process statistics, up to that rounding.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..distributed import merge_over_ranks, shard
from ..errors import NumericsError
from ..perm import PermSpec, observation_points
from ..perm.spec import TapPoint
from ..probe.engine import run_pass
from ..probe.blocks import Gathered, add_into, channel_view, per_image, products
from ..probe.stats import common_precision, with_own_products
from ..probe.taps import tap_model
from ..timing import stage


class JointMoments:
    """Count, mean and centred scatter of the concatenation ``[a, b]`` of two aligned (samples, C) streams.

    The scatter is accumulated as its three blocks Σ_AA, Σ_AB and Σ_BB (:attr:`saa`, :attr:`sab`, :attr:`sbb`),
    each its own float64 tensor; the whole symmetric matrix (:attr:`scatter`, with Σ_BA = Σ_ABᵀ) is assembled
    the first time it is read, the blocks then becoming views of it. A pass thus holds 3/4 of it and never
    transposes: regression alignment and OT fusion read the blocks only.

    Attributes:
        n: samples seen.
        size_a: channels of ``a`` (the first block).
        mean: (Ca+Cb,) float64.
        scatter: (Ca+Cb, Ca+Cb) float64, the sum over samples of the outer products of the deviations.
    """

    def __init__(self) -> None:
        self.n = 0
        self.size_a: int | None = None
        self.mean: torch.Tensor | None = None
        self._blocks: list[torch.Tensor] | None = None  # Σ_AA, Σ_AB, Σ_BB
        self._scatter: torch.Tensor | None = None  # the whole matrix, once assembled
        self._lower_stale = False  # Σ_BA of the assembled matrix not yet rewritten after an update

    @property
    def scatter(self) -> torch.Tensor | None:
        if self._blocks is None:
            return None
        ca = self.size_a
        with torch.inference_mode(self._blocks[0].is_inference()):  # written in a pass, read after it
            if self._scatter is None:
                saa, sab, sbb = self._blocks
                d = len(self.mean)
                full = torch.empty((d, d), dtype=torch.float64, device=saa.device)
                full[:ca, :ca], full[:ca, ca:], full[ca:, ca:] = saa, sab, sbb
                self.scatter = full  # the separate blocks are freed: from now on they are views of it
                self._lower_stale = True
            if self._lower_stale:
                self._scatter[ca:, :ca] = self._scatter[:ca, ca:].T
                self._lower_stale = False
        return self._scatter

    @scatter.setter
    def scatter(self, value: torch.Tensor | None) -> None:
        self._scatter, self._lower_stale = value, False
        if value is None:
            self._blocks = None
        else:
            ca = self.size_a
            self._blocks = [value[:ca, :ca], value[:ca, ca:], value[ca:, ca:]]

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add a batch: ``a`` (samples, Ca) and ``b`` (samples, Cb), row i of both from the same sample."""
        self.update_channels(a, b, -1)

    def update_channels(self, a: torch.Tensor, b: torch.Tensor, channel_dim: int = 1) -> None:
        """Add a batch in its own layout (e.g. (N, C, H, W) with ``channel_dim`` 1; every image × position a
        sample): :func:`update_shared` with one ``b``."""
        update_shared([self], a, [b], channel_dim)

    def _combine_blocks(self, n: int, mean: torch.Tensor, saa: torch.Tensor, sab: torch.Tensor,
                        sbb: torch.Tensor, offset: torch.Tensor | None = None) -> None:
        """Chan et al.'s update with a batch's (or another accumulator's) scatter given as its blocks Σ_AA, Σ_AB,
        Σ_BB (float32 or float64), added in place into the float64 blocks.

        With ``offset`` u (Ca+Cb,), the blocks are products of deviations offset by it, Σ (x − mean + u)(…)ᵀ
        (uncentred: u = mean), corrected here by −n·u uᵀ, in the same rank-two update as Chan et al.'s term."""
        ca = saa.shape[0]
        left, right = [], []  # the rank-one terms: left[k] ⊗ right[k]
        if offset is not None:
            left.append(offset)
            right.append(offset * -n)
        if self.mean is None:
            self._blocks = [block.to(torch.float64, copy=True) for block in (saa, sab, sbb)]
            self.n, self.mean, self.size_a = n, mean, ca
            added = (None, None, None)
        else:
            if ca != self.size_a or mean.shape != self.mean.shape:
                raise ValueError("JointMoments: batches with different channel counts")
            total = self.n + n
            delta = mean.to(self.mean.device) - self.mean
            left.append(delta)
            right.append(delta * (self.n * n / total))
            self.mean = self.mean + delta * (n / total)
            self.n = total
            added = (saa, sab, sbb)
        self._lower_stale = self._scatter is not None  # Σ_BA is rewritten when the whole matrix is next read
        if left:
            u, v = torch.stack(left, 1), torch.stack(right, 0)
            a, b = slice(None, ca), slice(ca, None)
            for block, rows, cols, add in zip(self._blocks, (a, a, b), (a, b, b), added):
                if add is not None:
                    add_into(block, add)
                block.addmm_(u[rows], v[:, cols])  # in place: (Ca+Cb)² float64 is a pass's largest buffer

    def merge(self, other: JointMoments) -> None:
        """Add another accumulator's samples (another rank, another observation point)."""
        if other.mean is not None:
            self._combine_blocks(other.n, other.mean, other.saa, other.sab, other.sbb)

    def swapped(self) -> JointMoments:
        """The same statistics with the roles of a and b exchanged (a copy)."""
        out = JointMoments()
        ca = self.size_a
        out.n, out.size_a = self.n, len(self.mean) - ca
        out.mean = torch.cat([self.mean_b, self.mean_a])
        out._blocks = [self.sbb.clone(), self.sab.T.contiguous(), self.saa.clone()]
        return out

    def diagonal(self) -> torch.Tensor:
        """The scatter's diagonal (Ca+Cb,): each channel's sum of squared deviations."""
        return torch.cat([self.saa.diagonal(), self.sbb.diagonal()])

    # -- blocks -------------------------------------------------------------------------------------------
    @property
    def mean_a(self) -> torch.Tensor:
        return self.mean[: self.size_a]

    @property
    def mean_b(self) -> torch.Tensor:
        return self.mean[self.size_a:]

    @property
    def saa(self) -> torch.Tensor:
        """Scatter of a with itself (Ca, Ca)."""
        return self._blocks[0]

    @property
    def sab(self) -> torch.Tensor:
        """Cross scatter (Ca, Cb)."""
        return self._blocks[1]

    @property
    def sbb(self) -> torch.Tensor:
        """Scatter of b with itself (Cb, Cb)."""
        return self._blocks[2]

    def covariance(self) -> torch.Tensor:
        """The population covariance of ``[a, b]`` (scatter / n)."""
        return self.scatter / max(self.n, 1)

    def constant(self, rel_eps: float = 1e-6) -> torch.Tensor:
        """Boolean (Ca+Cb,): channels constant over the samples (std ≤ rel_eps · max(|mean|, largest std)),
        e.g. ReLU units that never fire on the data. Their correlations and canonical directions are undefined.
        """
        std = (self.diagonal().clamp_min(0) / max(self.n, 1)).sqrt()
        scale = torch.maximum(self.mean.abs(), std.amax().expand_as(std)).clamp_min(1e-300)
        return std <= rel_eps * scale

    def correlation(self, eps: float = 1e-12, constants_match: bool = False) -> torch.Tensor:
        """Pearson correlation of ``[a, b]`` with itself, (Ca+Cb, Ca+Cb).

        Entries involving a constant channel (:meth:`constant`) are 0, or, with ``constants_match``, 1 between
        two constant channels (indistinguishable on the data: pairing them changes nothing there).
        """
        s = self.scatter.diagonal().clamp_min(0).sqrt()
        denom = torch.outer(s, s)
        const = self.constant()
        corr = torch.where(denom > eps, self.scatter / denom.clamp_min(eps), torch.zeros_like(denom))
        both = const.unsqueeze(1) & const.unsqueeze(0)
        either = const.unsqueeze(1) | const.unsqueeze(0)
        return torch.where(either, both.to(corr.dtype) if constants_match else torch.zeros_like(corr), corr)


def update_shared(stats: Sequence[JointMoments], a: torch.Tensor, bs: Sequence[torch.Tensor],
                  channel_dim: int = 1) -> None:
    """Add one batch to the joint moments of ``a`` with each ``b`` (``stats[k]`` ← ``[a, bs[k]]``): A's deviations
    and Σ_AA are computed once for all, then Σ_AB and Σ_BB per model — 1 + 2k products instead of 4k.

    Every image × position is a sample. A batch's scatter blocks are float32 products summed in float64
    (:func:`mergescope.probe.blocks.products`) of the batch as it is, corrected by its float64 means, wherever that
    is as accurate as centring it first — tested on the diagonals of Σ_AA and Σ_BB, so a batch is read once for
    its sums and then by its products — else of the batch centred on its mean
    (:func:`mergescope.probe.stats.with_own_products`); batches are combined in float64 (Chan et al.), so the statistics
    agree with a float64 computation to float32 rounding (~1e-7 relative), the precision of the float32
    activations themselves. A product over the positions of each image is used when there are more positions
    than channels (a tall-skinny product is slow) or one image (a group of batches held channel-major by
    :class:`mergescope.probe.blocks.Gathered`), over the (samples, C) layout otherwise.
    """
    a, bs = common_precision(a, bs)
    a3 = channel_view(a, channel_dim)
    n = a3.shape[0] * a3.shape[2]
    b3s = [channel_view(b, channel_dim) for b in bs]
    by_image = per_image(a3, b3s)
    xa, mean_a, ua, saa = with_own_products(a3, by_image)
    for st, b3 in zip(stats, b3s):
        xb, mean_b, ub, sbb = with_own_products(b3, by_image)
        st._combine_blocks(n, torch.cat([mean_a, mean_b]), saa, products(xa, xb, by_image), sbb,
                           torch.cat([ua, ub]))


PLACES = ("observe", "preactivation")  # where a group's joint statistics can be gathered (:func:`group_points`)


def group_points(spec: PermSpec, group: str, at: str = "observe", points: str = "stage_end") -> list[TapPoint]:
    """The tap points whose images × positions are pooled into ``group``'s statistics.

    ``"observe"``: the group's observation points (post-activation outputs, residual block outputs) that
    ``points`` selects (:func:`mergescope.perm.observation_points`: a residual stream's stage end by default, or
    ``"all"``); ``"preactivation"``: the input of the nonlinearity (OT fusion's pre-activations, Singh & Jaggi
    2020) — for a residual stream, the sum of the add before the ReLU at those same observation points (the
    stream's own pre-activation: at its stage's last block by default), for any other group its repair points,
    each conv/linear output after its BatchNorm.
    """
    if at == "observe":
        return observation_points(spec.groups[group], points)
    if at == "preactivation":
        if any(t.group == group for t in spec.block_outputs):
            return [spec.activation_inputs.get(t.name, t) for t in observation_points(spec.groups[group], points)]
        return [p.tap for p in spec.repair_points if p.tap.group == group]
    raise ValueError(f"at must be one of {', '.join(PLACES)}; got {at!r}")


def group_covariances(
    reference: nn.Module,
    others: Sequence[nn.Module],
    spec: PermSpec,
    batches: Iterable,
    device: torch.device | str = "cpu",
    groups: Sequence[str] | None = None,
    progress: bool = False,
    total: int | None = None,
    at: str = "observe",
    points: str = "stage_end",
) -> list[dict[str, JointMoments]]:
    """Joint feature statistics of the reference with every other model, per group, in ONE data pass.

    Args:
        reference: model A (all models share the architecture described by ``spec``).
        others: the models B₁…B_n.
        spec: the permutation spec; each group is measured at :func:`group_points` (``at``, ``points``), the
            images × positions of every point pooled.
        batches: iterable of batches with an ``.x`` tensor.
        groups: restrict to these group names (default: all).
        at: ``"observe"`` or ``"preactivation"`` (:func:`group_points`); several places in one pass:
            :func:`group_covariances_at`.
        points: which observation points of a residual stream: ``"stage_end"`` (default) or ``"all"``.

    Returns:
        For each model of ``others``, ``{group: JointMoments}`` with a = the reference's channels.

    Example:
        >>> [stats] = group_covariances(model_a, [model_b], build_spec(model_a), iter_batches(ds, 500))
        >>> stats["features.0"].correlation().shape
        torch.Size([16, 16])
    """
    return group_covariances_at(reference, others, spec, batches, (at,), device, groups, progress, total,
                                points)[at]


def group_covariances_at(
    reference: nn.Module,
    others: Sequence[nn.Module],
    spec: PermSpec,
    batches: Iterable,
    places: Sequence[str],
    device: torch.device | str = "cpu",
    groups: Sequence[str] | None = None,
    progress: bool = False,
    total: int | None = None,
    points: str = "stage_end",
) -> dict[str, list[dict[str, JointMoments]]]:
    """:func:`group_covariances` at several places (:data:`PLACES`) in the same ONE pass:
    ``{place: [per model of others {group: JointMoments}]}``."""
    names = list(spec.groups) if groups is None else list(groups)
    taps_of = {(place, g): group_points(spec, g, place, points) for place in dict.fromkeys(places) for g in names}
    taps = sorted({t.name for pts in taps_of.values() for t in pts})
    tapped = {str(i): tap_model(m, taps).to(device).eval() for i, m in enumerate([reference, *others])}
    stats = [{key: JointMoments() for key in taps_of} for _ in others]

    gathered = Gathered(update_shared)

    def consume(batch, x, outs):
        ref = outs["0"][1]
        for key, pts in taps_of.items():
            for t in pts:
                gathered.add((key, t.name), [st[key] for st in stats], ref[t.name],
                             [outs[str(k + 1)][1][t.name] for k in range(len(others))], t.channel_dim)

    batches, total = shard(batches, total)
    run_pass(tapped, batches, consume, device=device, desc="joint feature statistics", total=total,
             progress=progress)
    with torch.inference_mode(), stage("statistics"):  # the pass's tensors are inference tensors
        gathered.flush()
    merged = iter(merge_over_ranks([st for per_model in stats for st in per_model.values()], device))
    stats = [{key: next(merged) for key in per_model} for per_model in stats]
    for k, per_group in enumerate(stats):  # NaN/Inf anywhere in a batch poisons the sums: checked once
        for (_, g), st in per_group.items():
            if st.mean is None:
                raise NumericsError("no data: the batches were empty")
            bad = ~torch.isfinite(st.diagonal())
            if bad.any():
                side = "the reference model" if bool(bad[: st.size_a].any()) else f"model {k + 1}"
                raise NumericsError(f"NaN/Inf activations in group '{g}' of {side}")
    return {place: [{g: st[place, g] for g in names} for st in stats] for place in dict.fromkeys(places)}
