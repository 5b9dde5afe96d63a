"""Oracles for REPAIR on a ResNet and for where a residual stream is matched (Jordan et al. 2023, REPAIR).

Both are written here literally from the reference notebooks' procedure (KellerJordan/REPAIR,
``Merge-ResNet50-ImageNet`` and ``Train-and-Permute-CIFAR10-ResNet20``), slowly and without the library's helpers,
and compared with the library on a *trained, non-permuted* digits ResNet20 pair (seeds 0 and 1):

* matching: a residual stream's permutation is the Hungarian assignment on the Pearson correlation of the two
  nets' outputs at the end of its stage (after the stage's last block); the all-points variant averages the
  correlation matrices of every place the stream is seen (stem activation and every block output).
* REPAIR: wrap every residual block so that a BatchNorm follows its output, with γ, β the α-interpolated
  endpoint std and mean at that block output; reset every BatchNorm (its own and the added ones) and run one
  train-mode pass with cumulative averaging; evaluate in eval mode.

The endpoint statistics are taken in eval mode and the added BatchNorm's ε is negligible, as the library
documents (the reference measures endpoints in train mode and uses BatchNorm's ε = 1e-5).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from mergescope.align import match_many
from mergescope.align.covariance import group_covariances
from mergescope.data import iter_batches, load_digits
from mergescope.merge import RepairTarget, interpolate_model, repair_many
from mergescope.merge.repair import extra_layers
from mergescope.perm import build_spec, permute_model
from mergescope.studies.sweep import SweepConfig
from mergescope.studies.sweep import run as run_sweep

ALPHA = 0.5
STAGES = ("layer1", "layer2", "layer3")
# the residual streams of ResNet20 (its permutation groups, named after their first conv) and their stage ends
STREAMS = {"conv1": "layer1", "layer2.0.conv2": "layer2", "layer3.0.conv2": "layer3"}


@pytest.fixture(scope="module")
def data():
    train, test = load_digits("train"), load_digits("test")
    return next(iter(iter_batches(train, len(train)))).x, next(iter(iter_batches(test, len(test)))).x


@pytest.fixture(scope="module")
def pair(trained_digits):
    return (trained_digits("resnet20", 0, in_channels=1, width=1),
            trained_digits("resnet20", 1, in_channels=1, width=1))


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"{s}.{j}", block) for s in STAGES for j, block in enumerate(getattr(model, s))]


def _outputs(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Eval-mode outputs of the named modules (forward hooks, removed afterwards)."""
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.detach()))
             for n in names]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _samples(t: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) -> (N·H·W, C) float64."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double().numpy()


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of every column of a with every column of b; 0 where a channel is constant."""
    a, b = a - a.mean(0), b - b.mean(0)
    cov = a.T @ b / len(a)
    sa, sb = np.sqrt((a**2).mean(0)), np.sqrt((b**2).mean(0))
    denom = np.outer(sa, sb)
    return np.where(denom > 1e-12, cov / np.where(denom > 1e-12, denom, 1.0), 0.0)


def _stream_views(model: nn.Module, x: torch.Tensor) -> dict[str, list[np.ndarray]]:
    """Per stream: its samples at every place it is seen, in order (stage 1 includes the stem's ReLU output)."""
    outs = _outputs(model, x, ["bn1"] + [n for n, _ in _blocks(model)])
    views = {g: [_samples(outs[f"{s}.{j}"]) for j in range(3)] for g, s in STREAMS.items()}
    views["conv1"].insert(0, _samples(torch.relu(outs["bn1"])))
    return views


# -- where a residual stream is matched ---------------------------------------------------------------------------

def test_a_residual_stream_is_matched_at_its_stage_end(pair, data):
    a, b = pair
    x = data[0]
    spec = build_spec(a)
    va, vb = _stream_views(a, x), _stream_views(b, x)
    [stage_end] = match_many(a, [b], spec, [type("B", (), {"x": x})()])
    [every] = match_many(a, [b], spec, [type("B", (), {"x": x})()], points="all")
    differs = 0
    for g in STREAMS:
        want_end = linear_sum_assignment(_pearson(va[g][-1], vb[g][-1]), maximize=True)[1]
        avg = sum(_pearson(pa, pb) for pa, pb in zip(va[g], vb[g])) / len(va[g])
        want_all = linear_sum_assignment(avg, maximize=True)[1]
        assert np.array_equal(stage_end.perms[g].numpy(), want_end), g
        assert np.array_equal(every.perms[g].numpy(), want_all), g
        differs += int((want_end != want_all).sum())
    assert differs > 0  # the two rules are different pairings on this trained pair
    for g in set(spec.groups) - set(STREAMS):  # one observation point: the same under both rules
        assert torch.equal(stage_end.perms[g], every.perms[g]), g


def test_joint_statistics_of_a_stream_come_from_its_stage_end(pair, data):
    a, b = pair
    x = data[0]
    [stats] = group_covariances(a, [b], build_spec(a), [type("B", (), {"x": x})()], groups=list(STREAMS))
    va, vb = _stream_views(a, x), _stream_views(b, x)
    for g in STREAMS:
        ya, yb = va[g][-1], vb[g][-1]
        assert stats[g].n == len(ya), g
        np.testing.assert_allclose(stats[g].mean_a.numpy(), ya.mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(stats[g].mean_b.numpy(), yb.mean(0), rtol=1e-6, atol=1e-7)
        cab = (ya - ya.mean(0)).T @ (yb - yb.mean(0))
        np.testing.assert_allclose(stats[g].sab.numpy(), cab, rtol=1e-6, atol=1e-6 * np.abs(cab).max())


# -- REPAIR on a ResNet ----------------------------------------------------------------------------------------

def _block_stats(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per block: the per-channel mean and (population) std of its output over images × positions, float64."""
    outs = _outputs(model, x, [n for n, _ in _blocks(model)])
    return {n: (torch.from_numpy(_samples(o).mean(0)), torch.from_numpy(_samples(o).std(0))) for n, o in outs.items()}


def _reference_repair(a: nn.Module, b: nn.Module, x: torch.Tensor, alpha: float) -> nn.Module:
    """The notebook's procedure, step by step (module docstring)."""
    stats_a, stats_b = _block_stats(a, x), _block_stats(b, x)
    merged = copy.deepcopy(a)
    sa, sb = a.state_dict(), b.state_dict()
    merged.load_state_dict({k: alpha * sa[k] + (1 - alpha) * sb[k] if sa[k].is_floating_point() else sa[k]
                            for k in sa})
    for stage in STAGES:
        layer = getattr(merged, stage)
        for j in range(len(layer)):
            (mu_a, sd_a), (mu_b, sd_b) = stats_a[f"{stage}.{j}"], stats_b[f"{stage}.{j}"]
            bn = nn.BatchNorm2d(len(mu_a), eps=1e-10)
            with torch.no_grad():
                bn.bias.copy_(alpha * mu_a + (1 - alpha) * mu_b)  # goal mean
                bn.weight.copy_(alpha * sd_a + (1 - alpha) * sd_b)  # goal std
            layer[j] = nn.Sequential(layer[j], bn)
    for m in merged.modules():  # reset every BatchNorm, the added ones too, and re-estimate in train mode
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    merged.train()
    with torch.no_grad():
        merged(x)
    return merged.eval()


@pytest.fixture(scope="module")
def repaired(pair, data):
    """B aligned by the library's activation matching; the merge at α repaired by the oracle and the library."""
    a, b = pair
    x = data[0]
    spec = build_spec(a)
    batch = [type("B", (), {"x": x})()]
    [match] = match_many(a, [b], spec, batch)
    b_aligned = permute_model(b, spec, match.perms)
    nets = {fix: interpolate_model(a, b_aligned, ALPHA) for fix in ("repair", "repair_preact", "reset")}
    repair_many([a, b_aligned], spec, batch,
                repair=[RepairTarget(nets["repair"], (ALPHA, 1 - ALPHA)),
                        RepairTarget(nets["repair_preact"], (ALPHA, 1 - ALPHA), points="preact")],
                reset=[nets["reset"]])
    return a, b_aligned, _reference_repair(a, b_aligned, x, ALPHA), nets


def test_repair_of_a_resnet_is_the_reference_procedure(repaired, data):
    a, _, oracle, nets = repaired
    with torch.no_grad():
        want, got = oracle(data[1]), nets["repair"](data[1])
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-3
    assert extra_layers(nets["repair"]) == [n for n, _ in _blocks(a)]  # one added layer per block
    assert extra_layers(nets["repair_preact"]) == []
    assert nets["repair_preact"].state_dict().keys() == a.state_dict().keys()  # the original architecture
    # every BatchNorm of the model was reset as in the oracle (the added ones are compared through the outputs)
    for name, m in nets["repair"].named_modules():
        if isinstance(m, nn.BatchNorm2d) and not name.endswith("output_norm"):
            ref = oracle.get_submodule(_oracle_name(name))
            torch.testing.assert_close(m.running_mean, ref.running_mean, rtol=1e-4, atol=1e-5, msg=name)
            torch.testing.assert_close(m.running_var, ref.running_var, rtol=1e-4, atol=1e-5, msg=name)


def _oracle_name(name: str) -> str:
    """A BatchNorm's name in the oracle, whose blocks are wrapped in nn.Sequential(block, bn)."""
    parts = name.split(".")
    if parts[0] in STAGES and len(parts) > 2:
        parts.insert(2, "0")
    return ".".join(parts)


def test_repaired_block_outputs_hit_the_interpolated_targets(repaired, data):
    a, b_aligned, _, nets = repaired
    x = data[0]
    stats_a, stats_b = _block_stats(a, x), _block_stats(b_aligned, x)
    got = _block_stats(nets["repair"], x)  # the block modules now end with their added layer
    before = _block_stats(nets["reset"], x)
    off = 0.0
    for name, (mu_a, sd_a) in stats_a.items():
        mu_b, sd_b = stats_b[name]
        t_mean, t_std = ALPHA * mu_a + (1 - ALPHA) * mu_b, ALPHA * sd_a + (1 - ALPHA) * sd_b
        scale = t_std.max().item()
        torch.testing.assert_close(got[name][0], t_mean, rtol=1e-3, atol=1e-3 * scale, msg=name)
        torch.testing.assert_close(got[name][1], t_std, rtol=1e-3, atol=1e-3 * scale, msg=name)
        off = max(off, ((before[name][1] - t_std).abs() / t_std.clamp_min(1e-3 * scale)).max().item())
    assert off > 0.05  # RESET alone leaves the block outputs off their targets


def test_repair_and_reset_are_different_methods_on_a_resnet(repaired, data):
    _, _, _, nets = repaired
    with torch.no_grad():
        out = {k: m(data[1]) for k, m in nets.items()}
    scale = out["reset"].abs().max()
    assert ((out["repair"] - out["reset"]).abs().max() / scale).item() > 0.05
    assert ((out["repair"] - out["repair_preact"]).abs().max() / scale).item() > 0.05


def test_the_sweep_repairs_a_resnet_as_the_reference_and_says_so(pair, data):
    a, b = pair
    train, test = load_digits("train"), load_digits("test")
    methods = ["permuted+repair", "permuted+repair_preact", "permuted+reset"]
    res = run_sweep(a, b, train, {"test": test}, SweepConfig(alphas=[0.0, 0.5, 1.0], methods=methods,
                                                              batch_size=len(train)))
    assert extra_layers(res.midpoint["permuted+repair"]) == [n for n, _ in _blocks(a)]
    assert extra_layers(res.midpoint["permuted+repair_preact"]) == []
    corrects = res.to_json()["corrections"]
    assert "9 residual block outputs" in corrects["permuted+repair"] and "reset" in corrects["permuted+repair"]
    assert "pre-activation" in corrects["permuted+repair_preact"]
    loss = {r["method"]: r["loss"] for r in res.rows if r["alpha"] == 0.5}
    assert abs(loss["permuted+repair"] - loss["permuted+reset"]) > 1e-3
    assert abs(loss["permuted+repair"] - loss["permuted+repair_preact"]) > 1e-3
