"""REPAIR (Jordan et al. 2023) and RESET, for any number of merged models in ONE data pass.

REPAIR sets the per-channel mean and std (over images × positions) of chosen points of the merged model to the
interpolation of the endpoints'. For θ(α) = α·θ_A + (1−α)·P(θ_B) that is μ_t = α·μ_A + (1−α)·μ_B and
σ_t = α·σ_A + (1−α)·σ_B (B aligned; Jordan et al. 2023, arXiv:2211.08403: the std, not the variance).
The correction of a channel is the affine map y' = (y − μ_θ)·σ_t/σ_θ + μ_t. Which points it corrects
(:data:`REPAIR_POINTS`, :func:`repair_plan`):

* ``"reference"`` (the default) — what REPAIR's reference code does for the architecture.
  *Residual networks* (the spec has residual block outputs), as ``Merge-ResNet50-ImageNet`` (KellerJordan/REPAIR)
  does: every residual block is wrapped so that a BatchNorm-like per-channel correction follows its output (after
  the add and the ReLU that follows it; the stem and the classifier are not wrapped); its goal mean and std are
  the α-interpolated endpoint statistics *at that block output*, and every BatchNorm of the merged model has its
  statistics reset. The reference measures the endpoints' block-output statistics (one pass per endpoint), then
  runs ONE pass over the merged model with every BatchNorm — its own and the added ones — in train mode (each
  normalizes with the batch's statistics, cumulative running averages), so the added layers see upstream layers
  already reset, and evaluates in eval mode. The correction cannot be folded into the weights — the shortcut
  carries a block's output on to every later block — so the repaired model gains one layer per block
  (:func:`extra_layers`): here an eval-mode ``BatchNorm`` appended to the block module (its class becomes a
  subclass that applies ``output_norm`` after its own forward; parameter names and layer names are unchanged,
  and the block's layer name now denotes the corrected output). Its γ, β are σ_t, μ_t and its running statistics
  the merged model's block-output statistics, like the reference's ``ResetLayer``.
  *Other networks* (VGG, MLP, plain CNNs), as REPAIR's VGG/MLP notebooks: every pre-activation point below.
* ``"preact"`` — every pre-activation output (after the conv's BatchNorm if it has one; the conv/linear output
  otherwise — :attr:`PermSpec.repair_points`), fused into the BatchNorm's γ, β or the layer's weight and bias: the
  repaired model has the original architecture. On a ResNet this corrects the BatchNorm outputs inside the
  blocks only (little more than RESET does); it is mergescope's architecture-preserving variant.

Differences from the reference, all in the statistics pass: the endpoints are measured in eval mode with their
own BatchNorm statistics (the reference resets and measures them in train mode), stds are population stds over
the whole set (the reference averages per-batch variances), and the in-pass targets below are per batch.

**Merges with maps, and many models.** A merged model θ = Σ_k w_k·T_k(θ_k) of any number of endpoints, each
rewritten by per-group linear maps (:mod:`mergescope.merge.maps`: CCA, OT, regression, ZipIt!, or permutations),
gets the targets its channels stand for: channel c of the merged model is the weighted sum of the mapped
endpoint features (forward_k @ y_k)_c, so μ_t = Σ_k w_k·mean((forward_k y_k)_c) and σ_t = Σ_k w_k·std((forward_k
y_k)_c), measured on the endpoints' own activations. For permutation maps (and identity maps on aligned models)
this is exactly the rule above.

One pass serves all: each batch runs through every endpoint and every merged model. Downstream layers must see
upstream layers already corrected, so during the pass each merged model's corrected points are renormalized with
the *batch's* statistics towards the *same batch's* endpoint targets (as the reference's BatchNorm layers in train
mode do, but with per-batch targets), while its population statistics accumulate; the final correction uses the
population statistics. With ``"preact"`` (and on non-residual nets), a merged model equal to an endpoint (α = 0
or 1) gets the identity up to rounding; the residual rule also resets its BatchNorm statistics.

RESET (Jordan et al. 2023 §4): recompute the BatchNorm running statistics of a merged model on the data
(BatchNorm layers in train mode with cumulative averaging, the rest in eval mode) — in the same pass.

Inside a ``torch.distributed`` process group each rank walks its share of the batches (the in-pass corrections
use only the batch's own statistics, so each batch is treated as in one process) and, before any correction is
computed, the population moments are merged and the BatchNorm averages combined over the ranks
(:mod:`mergescope.distributed`); every rank ends with the same repaired models.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..distributed import all_reduce, merge_over_ranks, shard, world
from ..errors import ArchitectureError, NumericsError
from ..perm import PermSpec, RepairPoint
from ..probe.engine import run_pass
from ..probe.stats import Moments, as_samples
from ..probe.taps import tap_model
from .maps import ChannelMap, permutation_index

_EPS = 1e-5
REPAIR_POINTS = ("reference", "preact")  # which points REPAIR corrects (module docstring)
_BATCHNORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}  # by tensor rank


class _BatchRenorm(nn.Module):
    """Spliced in after a repair point: records population moments, renormalizes to the batch target."""

    def __init__(self, channel_dim: int, in_place: bool = False):
        super().__init__()
        self.channel_dim = channel_dim
        self.in_place = in_place  # the input is a fresh tensor nothing else reads (:data:`_FRESH`): overwrite it
        self.moments = Moments()
        self.ndim = 0  # rank of the tensors seen (the added BatchNorm's kind)
        self.target: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, std), set per batch

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        self.ndim = y.dim()
        mean, std = self.moments.update_channels(y, self.channel_dim)  # batch stats, (C,) each, no reshape
        t_mean, t_std = self.target
        scale = torch.where(std > _EPS, t_std / std.clamp_min(_EPS), torch.ones_like(std))
        shape = [1] * y.dim()
        shape[self.channel_dim] = -1
        # (y − μ)·s + μ_t as one fused multiply-add: y·s + (μ_t − μ·s); in place, no new batch-sized tensor
        shift, scale = (t_mean - mean * scale).view(shape).to(y.dtype), scale.view(shape).to(y.dtype)
        return torch.addcmul(shift, y, scale, out=y) if self.in_place else torch.addcmul(shift, y, scale)


class _WithOutputNorm:
    """Mixin of a block REPAIR corrected: the block's own forward, then the BatchNorm ``output_norm`` it gained."""

    def forward(self, *args, **kwargs):
        return self.output_norm(super().forward(*args, **kwargs))


@functools.lru_cache(maxsize=None)
def _corrected_class(cls: type) -> type:
    return type(f"Repaired{cls.__name__}", (_WithOutputNorm, cls), {})


def extra_layers(model: nn.Module) -> list[str]:
    """The blocks of ``model`` that REPAIR gave an extra output layer (empty: the original architecture)."""
    return [name for name, m in model.named_modules() if isinstance(m, _WithOutputNorm)]


def repair_plan(spec: PermSpec, points: str = "reference") -> tuple[list[RepairPoint], bool]:
    """Where REPAIR corrects a model of ``spec`` under the rule ``points`` (module docstring), and whether it also
    resets every BatchNorm: residual nets under ``"reference"`` — each block output (kind ``"block"``), reset;
    otherwise the pre-activation points, fused, no reset."""
    if points not in REPAIR_POINTS:
        raise ValueError(f"REPAIR points must be one of {', '.join(REPAIR_POINTS)}; got {points!r}")
    if points == "reference" and spec.block_outputs:
        return [RepairPoint(t, t.name, "block") for t in spec.block_outputs], True
    return list(spec.repair_points), False


def describe_repair(spec: PermSpec, points: str = "reference") -> str:
    """One line: which points REPAIR corrects on this architecture under ``points`` (for reports)."""
    pts, reset = repair_plan(spec, points)
    if reset:
        return (f"{len(pts)} residual block outputs (after add + ReLU), each through an added per-channel affine "
                "(extra layers); every BatchNorm's statistics reset")
    return f"{len(pts)} pre-activation outputs (after BatchNorm if any), fused into the weights"


def _fuse(model: nn.Module, point: RepairPoint, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Fold y' = scale·y + shift (per channel) into the parameters that produce y."""
    module = model.get_submodule(point.module)
    with torch.no_grad():
        if point.kind == "batchnorm":
            if module.weight is None:
                raise ArchitectureError(f"REPAIR needs an affine BatchNorm at '{point.module}'")
            module.weight.mul_(scale.to(module.weight))
            module.bias.mul_(scale.to(module.bias)).add_(shift.to(module.bias))
            return
        weight = module.weight
        weight.mul_(scale.to(weight).view(-1, *[1] * (weight.dim() - 1)))
        if module.bias is None:
            raise ArchitectureError(f"REPAIR cannot fuse a mean shift into '{point.module}' (no bias, no BatchNorm)")
        module.bias.mul_(scale.to(module.bias)).add_(shift.to(module.bias))


def _block(model: nn.Module, point: RepairPoint) -> nn.Module:
    """The module whose output is the block output ``point`` (its layer name is the module's name)."""
    try:
        return model.get_submodule(point.module)
    except AttributeError:
        raise ArchitectureError(f"REPAIR's residual correction needs the block output '{point.module}' to be the "
                                "output of a module of that name; use the '+repair_preact' variant") from None


def _add_output_norm(model: nn.Module, point: RepairPoint, got: Moments, t_mean: torch.Tensor,
                     t_std: torch.Tensor, ndim: int) -> None:
    """Append to the block at ``point`` an eval-mode BatchNorm with γ = σ_t, β = μ_t and running statistics the
    block output's (μ_θ, σ_θ²): y' = (y − μ_θ)·σ_t/σ_θ + μ_t, the reference's ``ResetLayer`` after its pass.
    """
    block = _block(model, point)
    live = got.std > _EPS
    if isinstance(block, _WithOutputNorm):  # repaired before: compose the new correction into its BatchNorm
        scale = torch.where(live, t_std / got.std.clamp_min(_EPS), torch.ones_like(got.std))
        _fuse(model, RepairPoint(point.tap, f"{point.module}.output_norm", "batchnorm"), scale.float(),
              (t_mean - scale * got.mean).float())
        return
    if point.tap.channel_dim != 1 or ndim not in _BATCHNORMS:
        raise ArchitectureError(f"REPAIR's residual correction needs channels-first block outputs at "
                                f"'{point.module}'; use the '+repair_preact' variant")
    eps = _EPS**2  # so that rv + eps = σ_θ² for every live channel (σ_θ > _EPS)
    norm = _BATCHNORMS[ndim](point.tap.channels, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.where(live, t_std, torch.ones_like(t_std)).float())
        norm.bias.copy_(t_mean.float())
        norm.running_mean.copy_(got.mean.float())
        norm.running_var.copy_(torch.where(live, got.var - eps, torch.full_like(got.var, 1 - eps)).float())
    param = next(block.parameters(), None)
    block.output_norm = norm.to(param.device if param is not None else "cpu").eval()
    block.__class__ = _corrected_class(type(block))


def _share_running_stats(models: Iterable[nn.Module]) -> None:
    """RESET's cumulative BatchNorm averages over every rank's batches: each rank's average of its batches' means
    and variances weighted by its number of batches (one process averages all batches equally)."""
    if world()[1] == 1:
        return
    norms = list({id(m): m for model in models for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None}.values())
    parts = []
    for m in norms:
        n = m.num_batches_tracked.double().view(1)
        parts += [n, m.running_mean.double() * n, m.running_var.double() * n]
    if not parts:
        return
    sums = all_reduce(torch.cat(parts)).split([n for m in norms for n in (1, m.num_features, m.num_features)])
    with torch.no_grad():
        for i, m in enumerate(norms):
            n, mean, var = sums[3 * i: 3 * i + 3]
            if n > 0:
                m.num_batches_tracked.fill_(int(n))
                m.running_mean.copy_(mean / n)
                m.running_var.copy_(var / n)


def _reset_mode(model: nn.Module) -> nn.Module:
    """Eval mode except BatchNorm, which re-estimates its statistics from scratch (cumulative average)."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
            m.train()
    return model


@dataclass(frozen=True)
class RepairTarget:
    """A merged model to REPAIR, and what it is made of: θ = Σ_k weights[k]·T_k(θ_k) over the pass's endpoints.

    Attributes:
        model: the merged model; repaired in place.
        weights: one weight per endpoint (e.g. (α, 1−α)).
        maps: per endpoint, group -> :class:`~mergescope.merge.maps.ChannelMap` into the merged space (a missing
            group, ``{}`` or None: the identity, i.e. the endpoint is already aligned).
        points: which points to correct: ``"reference"`` (REPAIR's reference: residual block outputs through
            added layers + BatchNorm reset on residual nets, pre-activations elsewhere) or ``"preact"``
            (pre-activations, fused; the original architecture). See :func:`repair_plan`.
    """

    model: nn.Module
    weights: Sequence[float]
    maps: Sequence[Mapping[str, ChannelMap] | None] | None = None
    points: str = "reference"


def _transform(cmap: ChannelMap | None, device) -> torch.Tensor | None:
    """How to take an endpoint's (samples, C_k) to the merged channels: None (identity), an index, or forward."""
    if cmap is None:
        return None
    idx = permutation_index(cmap.forward)
    return (idx if idx is not None else cmap.forward).to(device)


def _apply(samples: torch.Tensor, how: torch.Tensor | None) -> torch.Tensor:
    if how is None:
        return samples
    if not how.is_floating_point():
        return samples.index_select(1, how)
    return samples @ how.to(samples.dtype if samples.dtype == torch.float64 else torch.float32).T


def _is_index(how: torch.Tensor) -> bool:
    return not how.is_floating_point()


def _pick(v: torch.Tensor, how: torch.Tensor | None) -> torch.Tensor:
    """A (C,) statistic of an endpoint's channels, in the merged channels' order (identity or permutation)."""
    return v if how is None else v.index_select(0, how.to(v.device))


def _picked(m: Moments, how: torch.Tensor | None) -> Moments:
    """The population moments of the permuted channels: the same moments, reordered."""
    return m if how is None or m.mean is None else m.reindexed(how)


def _check_finite(population: Mapping[tuple, Moments]) -> None:
    """Any NaN/Inf activation of an endpoint reaches its reduced moments: checked once, after the pass."""
    for (k, name, _), m in population.items():
        if m.mean is not None and not (torch.isfinite(m.mean).all() and torch.isfinite(m.m2).all()):
            raise NumericsError(f"NaN/Inf activations at '{name}' of endpoint {k} (0 = the first model)")


_FRESH = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _fresh_output(model: nn.Module, name: str) -> bool:
    """Whether layer ``name`` is a module whose output is always a new tensor (a convolution, linear or
    normalization layer), so the renormalization spliced after it — the only reader of that output, the merged
    model having no taps — may overwrite it."""
    return isinstance(dict(model.named_modules()).get(name), _FRESH)


def repair_many(
    endpoints: Sequence[nn.Module],
    spec: PermSpec,
    batches: Iterable,
    repair: Sequence[RepairTarget] = (),
    reset: Sequence[nn.Module] = (),
    device: torch.device | str = "cpu",
    progress: bool = False,
    total: int | None = None,
) -> None:
    """REPAIR the ``repair`` targets and RESET the ``reset`` models in place, in one data pass.

    Args:
        endpoints: the models the merges were made of (untouched); their activations give the targets.
        spec: the permutation spec of the architecture (:func:`repair_plan` says where to renormalize).
        batches: data for the statistics (usually the training set).
        repair: merged models with their weights, maps and REPAIR rule; modified in place (on a residual net
            the ``"reference"`` rule adds one layer per block: :func:`extra_layers`).
        reset: models whose BatchNorm statistics are recomputed; modified in place (BN momentum stays None).

    Example:
        >>> maps = get_merge_method("cca")(AlignInputs([model_a, model_b], spec, stats={"observe": [stats]}))
        >>> merged = merge_models_with_maps([model_a, model_b], [0.5, 0.5], maps)
        >>> repair_many([model_a, model_b], spec, iter_batches(train, 500),
        ...             repair=[RepairTarget(merged, (0.5, 0.5), maps)])
    """
    plans = [repair_plan(spec, t.points) for t in repair]
    if any(not pts for pts, _ in plans):
        raise ArchitectureError("this architecture has no layer REPAIR can renormalize")
    for t, (pts, _) in zip(repair, plans):
        if len(t.weights) != len(endpoints) or (t.maps is not None and len(t.maps) != len(endpoints)):
            raise ValueError(f"a RepairTarget needs one weight (and one map set) per endpoint ({len(endpoints)})")
        for p in pts:
            if p.kind == "block":
                _block(t.model, p)  # fail before the pass, not after it
    names = list(dict.fromkeys(p.tap.name for pts, _ in plans for p in pts))
    models: dict[str, nn.Module] = {}
    if repair:
        models.update({f"end{k}": tap_model(m, names).to(device).eval() for k, m in enumerate(endpoints)})
    for i, m in enumerate(reset):
        models[f"reset{i}"] = _reset_mode(m.to(device))
    renorms = [{p.tap.name: _BatchRenorm(p.tap.channel_dim, _fresh_output(t.model, p.tap.name)) for p in pts}
               for t, (pts, _) in zip(repair, plans)]
    tapped = []
    for t, r, (_, reset_bn) in zip(repair, renorms, plans):
        gm = tap_model(t.model, (), r).to(device)
        tapped.append(_reset_mode(gm) if reset_bn else gm.eval())  # BatchNorms are shared with t.model

    # per target, endpoint and point: the key of the endpoint's mapped statistics (shared by equal maps)
    transforms: dict[tuple, torch.Tensor | None] = {}
    keys: list[dict[tuple[int, str], tuple]] = []
    for t, (pts, _) in zip(repair, plans):
        kt = {}
        for k in range(len(endpoints)):
            maps = (t.maps[k] if t.maps is not None else None) or {}
            for p in pts:
                cmap = maps.get(p.tap.group) if p.tap.group is not None else None
                key = (k, p.tap.name, None if cmap is None else id(cmap.forward))
                if key not in transforms:
                    transforms[key] = _transform(cmap, device)
                kt[k, p.tap.name] = key
        keys.append(kt)
    # an endpoint point's own moments serve every identity/permutation map of it (permuting the (C,) vectors);
    # only a general linear map needs its mapped samples
    own = {(k, name): Moments() for (k, name, _), how in transforms.items() if how is None or _is_index(how)}
    mapped = {key: Moments() for key, how in transforms.items() if not (how is None or _is_index(how))}
    channel_dim = {p.tap.name: p.tap.channel_dim for pts, _ in plans for p in pts}

    def consume(batch, x, outs):
        if not repair:
            return
        feats = {(k, name): outs[f"end{k}"][1][name] for k, name, _ in transforms}
        raw = {kn: m.update_channels(feats[kn], channel_dim[kn[1]]) for kn, m in own.items()}
        batch_stats = {}
        for key, how in transforms.items():
            k, name, _ = key
            if key in mapped:
                batch_stats[key] = mapped[key].update(_apply(as_samples(feats[k, name], channel_dim[name]), how))
            else:
                batch_stats[key] = tuple(_pick(v, how) for v in raw[k, name])
        for t, kt, r, model in zip(repair, keys, renorms, tapped):
            for name, renorm in r.items():
                stats = [batch_stats[kt[k, name]] for k in range(len(endpoints))]
                renorm.target = (sum(w * m for w, (m, _) in zip(t.weights, stats)),
                                 sum(w * s for w, (_, s) in zip(t.weights, stats)))
            model(x)

    batches, total = shard(batches, total)
    run_pass(models, batches, consume, device=device, desc="REPAIR/RESET statistics", total=total,
             progress=progress)
    _share_running_stats([*reset, *(t.model for t, (_, reset_bn) in zip(repair, plans) if reset_bn)])
    renorm_list = [renorm for r in renorms for renorm in r.values()]
    pooled = [*own.values(), *mapped.values()]
    merged = merge_over_ranks(pooled + [rn.moments for rn in renorm_list], device)
    own.update(zip(own, merged[: len(own)]))
    mapped.update(zip(mapped, merged[len(own): len(pooled)]))
    ndims = all_reduce(torch.tensor([rn.ndim for rn in renorm_list], dtype=torch.int64), "max")  # a rank
    for renorm, moments, ndim in zip(renorm_list, merged[len(pooled):], ndims.tolist()):  # w/o batches: 0
        renorm.moments, renorm.ndim = moments, ndim
    population = {key: mapped[key] if key in mapped else _picked(own[key[:2]], how)
                  for key, how in transforms.items()}
    if repair:
        _check_finite(population)

    for m in reset:
        m.eval()
    for t, kt, r, (pts, _) in zip(repair, keys, renorms, plans):
        t.model.eval()
        for p in pts:
            got = r[p.tap.name].moments
            stats = [population[kt[k, p.tap.name]] for k in range(len(endpoints))]
            t_mean = sum(w * s.mean for w, s in zip(t.weights, stats))
            t_std = sum(w * s.std for w, s in zip(t.weights, stats))
            if p.kind == "block":
                _add_output_norm(t.model, p, got, t_mean, t_std, r[p.tap.name].ndim)
                continue
            scale = torch.where(got.std > _EPS, t_std / got.std.clamp_min(_EPS), torch.ones_like(got.std))
            _fuse(t.model, p, scale.float(), (t_mean - scale * got.mean).float())


def repair_and_reset(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermSpec,
    batches: Iterable,
    repair: Sequence[tuple[float, nn.Module]] = (),
    reset: Sequence[nn.Module] = (),
    device: torch.device | str = "cpu",
    progress: bool = False,
    total: int | None = None,
    points: str = "reference",
) -> None:
    """REPAIR the ``(alpha, merged model)`` pairs (θ = α·A + (1−α)·B) and RESET the ``reset`` models in place,
    in one data pass: :func:`repair_many` with endpoints A and B (B already aligned to A; both untouched) and the
    REPAIR rule ``points`` (:func:`repair_plan`).

    Example:
        >>> merged = interpolate_model(model_a, aligned_b, 0.5)
        >>> repair_and_reset(model_a, aligned_b, spec, iter_batches(train, 500), repair=[(0.5, merged)])
    """
    targets = [RepairTarget(m, (alpha, 1.0 - alpha), points=points) for alpha, m in repair]
    repair_many([model_a, model_b], spec, batches, targets, reset, device=device, progress=progress, total=total)
