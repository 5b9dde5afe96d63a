"""Shared fixtures for the permutation / alignment / merging invariant tests.

Zoo models are built once per session (the torchvision classifiers take ~1 s each to initialise) and handed
out shared: a test must not modify the model it gets (``permute_model``, ``interpolate_model`` copy).
"""
from __future__ import annotations

import functools
import os
import types

# Idle OpenMP threads sleep instead of spinning. On a busy 2-core machine (shared CI runners) spinning threads
# fight for the cores and small tensor ops run up to ~20x slower (this suite: ~330 s instead of ~70 s). Only
# effective if torch is not imported yet, which is the case when pytest loads this conftest first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from mergescope.models import create_model  # noqa: E402

torch.set_num_threads(2)

DIGIT_MODELS = ("mlp", "cnn_digits")


def image_shape(name: str) -> tuple[int, int, int]:
    """(C, H, W) a zoo model accepts: 1x8x8 digits, 3x64x64 for torchvision, 3x32x32 for the CIFAR zoo."""
    if name in DIGIT_MODELS:
        return (1, 8, 8)
    if name.startswith("tv_"):
        return (3, 64, 64)
    return (3, 32, 32)


def randomize_batchnorm(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics (so BN axes matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
                m.bias.copy_(0.3 * torch.randn(c, generator=g))
    return model


@functools.lru_cache(maxsize=None)
def _zoo_model(name: str) -> nn.Module:
    return randomize_batchnorm(create_model(name, seed=0)).eval()


@pytest.fixture(scope="session")
def zoo():
    """``zoo(name)``: a shared, eval-mode zoo model (seed 0, randomized BatchNorm statistics). Don't modify."""
    return _zoo_model


def random_images(name: str, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *image_shape(name), generator=g)


def image_batches(name: str, n: int, num_batches: int, seed: int = 0) -> list[types.SimpleNamespace]:
    """``num_batches`` batches of ``n`` random normal images (labels unused) as activation-matching input."""
    x = random_images(name, n * num_batches, seed)
    return [types.SimpleNamespace(x=c, y=torch.zeros(len(c), dtype=torch.long)) for c in x.split(n)]


def point_moments(model: nn.Module, spec, batches) -> dict:
    """Per repair point: Moments of the model's pre-activations over ``batches`` (eval mode)."""
    from mergescope.probe.stats import Moments, as_samples
    from mergescope.probe.taps import tap_model

    tapped = tap_model(model, [p.tap.name for p in spec.repair_points]).eval()
    out = {p.tap.name: Moments() for p in spec.repair_points}
    with torch.no_grad():
        for batch in batches:
            _, feats = tapped(batch.x)
            for p in spec.repair_points:
                out[p.tap.name].update(as_samples(feats[p.tap.name], p.tap.channel_dim))
    return out


def assert_repaired(spec, got: dict, before: dict, targets: dict) -> None:
    """REPAIR hit its targets: ``got`` (point moments of the repaired model) has every point's target mean and std
    (``targets[point] = (mean, std)``), and ``before`` (the unrepaired model's) was > 5 % off somewhere."""
    worst_before = 0.0
    for p in spec.repair_points:
        name = p.tap.name
        t_mean, t_std = targets[name]
        scale = t_std.max().item()
        torch.testing.assert_close(got[name].mean, t_mean, rtol=1e-4, atol=1e-4 * scale, msg=name)
        torch.testing.assert_close(got[name].std, t_std, rtol=1e-4, atol=1e-4 * scale, msg=name)
        worst_before = max(worst_before, ((before[name].std - t_std).abs() / t_std).max().item())
    assert worst_before > 0.05  # REPAIR had something to fix


def interpolated_targets(spec, stats_a: dict, stats_b: dict, alpha: float) -> dict:
    """REPAIR's targets for θ(α) = α·A + (1−α)·B from the endpoints' point moments: {point: (mean, std)}."""
    return {p.tap.name: (alpha * stats_a[p.tap.name].mean + (1 - alpha) * stats_b[p.tap.name].mean,
                         alpha * stats_a[p.tap.name].std + (1 - alpha) * stats_b[p.tap.name].std)
            for p in spec.repair_points}


@functools.lru_cache(maxsize=None)
def _trained_digits(arch: str, seed: int, epochs: int = 6, **kw) -> nn.Module:
    from mergescope.data import load_digits
    from mergescope.train import TrainConfig, train_model

    model = create_model(arch, seed=seed, **kw)
    train_model(model, load_digits("train"), TrainConfig(epochs=epochs, batch_size=64, lr=0.05, seed=seed),
                progress=False)
    return model.eval()


@pytest.fixture(scope="session")
def trained_digits():
    """``trained_digits(arch, seed, epochs=6, **arch_kwargs)``: a model trained on the digits' train split, shared
    across the session (don't modify it) — the *trained, non-permuted* pairs the oracle tests compare on, e.g.
    ``trained_digits("cnn_digits", 0, width=16)`` and ``trained_digits("cnn_digits", 1, width=16)``; also
    ``("resnet20", s, in_channels=1, width=1)`` and ``("cnn_digits", s, width=16, batchnorm=False)`` (no BN)."""
    return _trained_digits


@pytest.fixture(scope="session")
def digits_train():
    """The digits' train split (1,437 images), shared."""
    from mergescope.data import load_digits

    return load_digits("train")


@pytest.fixture(scope="session")
def digits_pair(trained_digits):
    """The oracle tests' trained, non-permuted pair: cnn_digits ×16, seeds 0 and 1 (as the demo's A and B)."""
    return trained_digits("cnn_digits", 0, width=16), trained_digits("cnn_digits", 1, width=16)


@pytest.fixture(scope="session")
def helpers():
    return types.SimpleNamespace(image_shape=image_shape, random_images=random_images,
                                 image_batches=image_batches, randomize_batchnorm=randomize_batchnorm,
                                 point_moments=point_moments, assert_repaired=assert_repaired,
                                 interpolated_targets=interpolated_targets, DIGIT_MODELS=DIGIT_MODELS)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One ``mergescope demo`` study folder for every test that reads one (the CLI's and the browser's): a test
    must not change it."""
    from mergescope.cli import main

    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    return out
