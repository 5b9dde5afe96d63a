"""REPAIR (Jordan et al. 2023) and RESET, for any number of merged models in ONE data pass.

REPAIR: at every pre-activation output (after the conv's BatchNorm if it has one; the conv/linear output
otherwise — :attr:`PermSpec.repair_points`), rescale each channel of the merged model so its mean and std over
images × positions become the interpolation of the endpoints'. For θ(α) = α·θ_A + (1−α)·P(θ_B) that is
μ_t = α·μ_A + (1−α)·μ_B and σ_t = α·σ_A + (1−α)·σ_B (B aligned). The correction y' = (y − μ_θ)·σ_t/σ_θ + μ_t is
an affine map per channel and is fused into the BatchNorm's γ, β or the layer's weight and bias, so the repaired
model has the original architecture.

**Merges with maps, and many models.** A merged model θ = Σ_k w_k·T_k(θ_k) of any number of endpoints, each
rewritten by per-group linear maps (:mod:`mergescope.merge.maps`: CCA, OT, regression, ZipIt!, or permutations),
gets the targets its channels stand for: channel c of the merged model is the weighted sum of the mapped
endpoint features (forward_k @ y_k)_c, so μ_t = Σ_k w_k·mean((forward_k y_k)_c) and σ_t = Σ_k w_k·std((forward_k
y_k)_c), measured on the endpoints' own activations. For permutation maps (and identity maps on aligned models)
this is exactly the rule above.

One pass serves all: each batch runs through every endpoint and every merged model. Downstream layers must see
upstream layers already corrected, so during the pass each merged model's pre-activations are renormalized with
the *batch's* statistics towards the *same batch's* endpoint targets (as REPAIR's reference does with BatchNorm
layers in train mode, but with per-batch targets), while its population statistics accumulate; the fused
correction uses the population statistics. When a merged model equals an endpoint (α = 0 or 1) every
correction is the identity up to rounding, on every batch.

RESET (Jordan et al. 2023 §4): recompute the BatchNorm running statistics of a merged model on the data
(BatchNorm layers in train mode with cumulative averaging, the rest in eval mode) — in the same pass.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ArchitectureError, NumericsError
from ..perm import PermSpec, RepairPoint
from ..probe.engine import run_pass
from ..probe.stats import Moments, as_samples
from ..probe.taps import tap_model
from .maps import ChannelMap, permutation_index

_EPS = 1e-5


class _BatchRenorm(nn.Module):
    """Spliced in after a repair point: records population moments, renormalizes to the batch target."""

    def __init__(self, channel_dim: int):
        super().__init__()
        self.channel_dim = channel_dim
        self.moments = Moments()
        self.target: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, std), set per batch

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        mean, std = self.moments.update(as_samples(y, self.channel_dim))  # batch stats, (C,) each
        t_mean, t_std = self.target
        scale = torch.where(std > _EPS, t_std / std.clamp_min(_EPS), torch.ones_like(std))
        shape = [1] * y.dim()
        shape[self.channel_dim] = -1
        return (y - mean.view(shape)) * scale.view(shape) + t_mean.view(shape)


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
    """

    model: nn.Module
    weights: Sequence[float]
    maps: Sequence[Mapping[str, ChannelMap] | None] | None = None


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
        spec: the permutation spec of the architecture (its ``repair_points`` say where to renormalize).
        batches: data for the statistics (usually the training set).
        repair: merged models with their weights and maps; modified in place.
        reset: models whose BatchNorm statistics are recomputed; modified in place (BN momentum stays None).

    Example:
        >>> res = cca_merge_many(model_a, [model_b], iter_batches(train, 500))
        >>> repair_many([model_a, model_b], spec, iter_batches(train, 500),
        ...             repair=[RepairTarget(res.model, res.weights, res.maps)])
    """
    points = spec.repair_points
    if repair and not points:
        raise ArchitectureError("this architecture has no layer REPAIR can renormalize")
    for t in repair:
        if len(t.weights) != len(endpoints) or (t.maps is not None and len(t.maps) != len(endpoints)):
            raise ValueError(f"a RepairTarget needs one weight (and one map set) per endpoint ({len(endpoints)})")
    names = [p.tap.name for p in points]
    models: dict[str, nn.Module] = {}
    if repair:
        models.update({f"end{k}": tap_model(m, names).to(device).eval() for k, m in enumerate(endpoints)})
    for i, m in enumerate(reset):
        models[f"reset{i}"] = _reset_mode(m.to(device))
    renorms = [{p.tap.name: _BatchRenorm(p.tap.channel_dim) for p in points} for _ in repair]
    tapped = [tap_model(t.model, (), r).to(device).eval() for t, r in zip(repair, renorms)]

    # per target, endpoint and point: the key of the endpoint's mapped statistics (shared by equal maps)
    transforms: dict[tuple, torch.Tensor | None] = {}
    keys: list[dict[tuple[int, str], tuple]] = []
    for t in repair:
        kt = {}
        for k in range(len(endpoints)):
            maps = (t.maps[k] if t.maps is not None else None) or {}
            for p in points:
                cmap = maps.get(p.tap.group) if p.tap.group is not None else None
                key = (k, p.tap.name, None if cmap is None else id(cmap.forward))
                if key not in transforms:
                    transforms[key] = _transform(cmap, device)
                kt[k, p.tap.name] = key
        keys.append(kt)
    population = {key: Moments() for key in transforms}
    channel_dim = {p.tap.name: p.tap.channel_dim for p in points}

    def consume(batch, x, outs):
        if not repair:
            return
        samples = {}  # (endpoint, point) -> (images × positions, C), shared by every map of that endpoint
        batch_stats = {}
        for key, how in transforms.items():
            k, name, _ = key
            if (k, name) not in samples:
                samples[k, name] = as_samples(outs[f"end{k}"][1][name], channel_dim[name])
            mean, std = batch_stats[key] = population[key].update(_apply(samples[k, name], how))
            if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):  # any NaN/Inf reaches these
                raise NumericsError(f"NaN/Inf activations at '{name}' of endpoint {k} (0 = the first model)")
        for t, kt, r, model in zip(repair, keys, renorms, tapped):
            for name, renorm in r.items():
                stats = [batch_stats[kt[k, name]] for k in range(len(endpoints))]
                renorm.target = (sum(w * m for w, (m, _) in zip(t.weights, stats)),
                                 sum(w * s for w, (_, s) in zip(t.weights, stats)))
            model(x)

    run_pass(models, batches, consume, device=device, desc="REPAIR/RESET statistics", total=total,
             progress=progress)

    for m in reset:
        m.eval()
    for t, kt, r in zip(repair, keys, renorms):
        for p in points:
            got = r[p.tap.name].moments
            stats = [population[kt[k, p.tap.name]] for k in range(len(endpoints))]
            t_mean = sum(w * s.mean for w, s in zip(t.weights, stats))
            t_std = sum(w * s.std for w, s in zip(t.weights, stats))
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
) -> None:
    """REPAIR the ``(alpha, merged model)`` pairs (θ = α·A + (1−α)·B) and RESET the ``reset`` models in place,
    in one data pass: :func:`repair_many` with endpoints A and B (B already aligned to A; both untouched).

    Example:
        >>> merged = interpolate_model(model_a, aligned_b, 0.5)
        >>> repair_and_reset(model_a, aligned_b, spec, iter_batches(train, 500), repair=[(0.5, merged)])
    """
    targets = [RepairTarget(m, (alpha, 1.0 - alpha)) for alpha, m in repair]
    repair_many([model_a, model_b], spec, batches, targets, reset, device=device, progress=progress, total=total)
