"""REPAIR (Jordan et al. 2023) and RESET, for any number of merged models in ONE data pass.

REPAIR: at every pre-activation output (after the conv's BatchNorm if it has one; the conv/linear output
otherwise — :attr:`PermSpec.repair_points`), rescale each channel of the merged model θ(α) so its mean and std
over images × positions become the interpolation of the endpoints': μ_t = α·μ_A + (1−α)·μ_B and
σ_t = α·σ_A + (1−α)·σ_B (B = the aligned model B). The correction y' = (y − μ_θ(α))·σ_t/σ_θ(α) + μ_t is an affine
map per channel and is fused into the BatchNorm's γ, β or the layer's weight and bias, so the repaired model
has the original architecture.

One pass serves all: each batch runs through A, B and every merged model. Downstream layers must see upstream
layers already corrected, so during the pass each merged model's pre-activations are renormalized with the
*batch's* statistics towards the *same batch's* endpoint targets (as REPAIR's reference does with BatchNorm
layers in train mode, but with per-batch targets), while its population statistics accumulate; the fused
correction uses the population statistics. When a merged model equals an endpoint (α = 0 or 1) every
correction is the identity up to rounding, on every batch.

RESET (Jordan et al. 2023 §4): recompute the BatchNorm running statistics of a merged model on the data
(BatchNorm layers in train mode with cumulative averaging, the rest in eval mode) — in the same pass.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..errors import ArchitectureError, NumericsError
from ..perm import PermSpec, RepairPoint
from ..probe.engine import run_pass
from ..probe.stats import Moments, as_samples
from ..probe.taps import tap_model

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
    """REPAIR the ``(alpha, merged model)`` pairs and RESET the ``reset`` models in place, in one data pass.

    Args:
        model_a, model_b: the endpoints (B already aligned to A); untouched.
        spec: the permutation spec (its ``repair_points`` say where to renormalize).
        batches: data for the statistics (usually the training set).
        repair: merged models with the α they were interpolated at; modified in place.
        reset: models whose BatchNorm statistics are recomputed; modified in place (BN momentum stays None).

    Example:
        >>> merged = interpolate_model(model_a, aligned_b, 0.5)
        >>> repair_and_reset(model_a, aligned_b, spec, iter_batches(train, 500), repair=[(0.5, merged)])
    """
    points = spec.repair_points
    if repair and not points:
        raise ArchitectureError("this architecture has no layer REPAIR can renormalize")
    names = [p.tap.name for p in points]
    models: dict[str, nn.Module] = {}
    if repair:
        models["A"] = tap_model(model_a, names).to(device).eval()
        models["B"] = tap_model(model_b, names).to(device).eval()
    for i, m in enumerate(reset):
        models[f"reset{i}"] = _reset_mode(m.to(device))
    renorms = [{p.tap.name: _BatchRenorm(p.tap.channel_dim) for p in points} for _ in repair]
    tapped = [tap_model(m, (), r).to(device).eval() for (_, m), r in zip(repair, renorms)]
    endpoint = {(k, p.tap.name): Moments() for k in "AB" for p in points}

    def consume(batch, x, outs):
        if not repair:
            return
        feats = {k: outs[k][1] for k in "AB"}
        batch_stats = {}
        for p in points:
            for k in "AB":
                y = feats[k][p.tap.name]
                mean, std = endpoint[k, p.tap.name].update(as_samples(y, p.tap.channel_dim))
                if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):  # any NaN/Inf reaches these
                    raise NumericsError(f"NaN/Inf activations at '{p.tap.name}' of model {k}")
                batch_stats[k, p.tap.name] = mean, std
        for (alpha, _), r, model in zip(repair, renorms, tapped):
            for name, renorm in r.items():
                (ma, sa), (mb, sb) = batch_stats["A", name], batch_stats["B", name]
                renorm.target = (alpha * ma + (1 - alpha) * mb, alpha * sa + (1 - alpha) * sb)
            model(x)

    run_pass(models, batches, consume, device=device, desc="REPAIR/RESET statistics", total=total,
             progress=progress)

    for m in reset:
        m.eval()
    for (alpha, model), r in zip(repair, renorms):
        for p in points:
            a, b, got = endpoint["A", p.tap.name], endpoint["B", p.tap.name], r[p.tap.name].moments
            t_mean = alpha * a.mean + (1 - alpha) * b.mean
            t_std = alpha * a.std + (1 - alpha) * b.std
            scale = torch.where(got.std > _EPS, t_std / got.std.clamp_min(_EPS), torch.ones_like(got.std))
            _fuse(model, p, scale.float(), (t_mean - scale * got.mean).float())
