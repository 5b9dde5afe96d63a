"""Interpolation endpoints, REPAIR/RESET statistics, and the full interpolation sweep on a trained pair."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mergescope.data import iter_batches, load_digits
from mergescope.errors import ArchitectureError
from mergescope.align import group_covariances
from mergescope.merge import (RepairTarget, alpha_grid, cca_maps, interpolate_model, interpolate_state,
                              merge_models_with_maps, permutation_maps, repair_and_reset, repair_many)
from mergescope.models import create_model
from mergescope.perm import build_spec, permute_model, random_perms
from mergescope.probe.stats import as_samples
from mergescope.probe.taps import tap_model
from mergescope.studies.sweep import SweepConfig
from mergescope.studies.sweep import run as run_sweep
from mergescope.train import TrainConfig, train_model


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


@pytest.fixture(scope="module")
def one_batch(digits):
    """The whole digits training split as ONE batch: in-pass batch statistics equal population ones."""
    [batch] = list(iter_batches(digits[0], len(digits[0])))
    return [batch]


def _pair(name, helpers, **kw):
    a = create_model(name, seed=0, **kw)
    b = create_model(name, seed=1, **kw)
    helpers.randomize_batchnorm(a, seed=2)
    helpers.randomize_batchnorm(b, seed=3)
    return a.eval(), b.eval()


def _rel_err(y, ref):
    return ((y - ref).abs().max() / ref.abs().max()).item()


# -- interpolation ---------------------------------------------------------------------------------------------

def test_interpolation_endpoints_are_bit_exact(helpers, digits):
    a, b = _pair("cnn_digits", helpers, width=4)
    # different BatchNorm step counters: integer buffers must come from the endpoint too
    for i, m in enumerate(mod for mod in a.modules() if isinstance(mod, nn.BatchNorm2d)):
        m.num_batches_tracked.fill_(5 + i)
    for m in b.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.fill_(40)
    x = next(iter(iter_batches(digits[1], 64))).x
    with torch.no_grad():
        for alpha, ref in ((1.0, a), (0.0, b)):
            merged = interpolate_model(a, b, alpha).eval()
            state, want = merged.state_dict(), ref.state_dict()
            assert state.keys() == want.keys()
            for k in want:
                assert state[k].dtype == want[k].dtype and torch.equal(state[k], want[k]), (alpha, k)
            assert torch.equal(merged(x), ref(x))
    mid = interpolate_state(a.state_dict(), b.state_dict(), 0.25)
    w = "features.0.weight"
    assert torch.allclose(mid[w], 0.25 * a.state_dict()[w] + 0.75 * b.state_dict()[w])


def test_alpha_grid():
    grid = alpha_grid()
    assert len(grid) == 21 and grid[0] == 0.0 and grid[-1] == 1.0
    assert 0.5 in grid and grid[10] == 0.5
    assert all(abs((hi - lo) - 0.05) < 1e-12 for lo, hi in zip(grid, grid[1:]))
    assert alpha_grid(1 / 3) == [0.0, round(1 / 3, 10), 0.5, round(2 / 3, 10), 1.0]  # the midpoint, never guessed


# -- REPAIR and RESET ------------------------------------------------------------------------------------------

def _outputs(model, batches):
    with torch.no_grad():
        return torch.cat([model.eval()(b.x) for b in batches])


@pytest.mark.parametrize("name, kw", [("cnn_digits", {"width": 8}), ("mlp", {"width": 32, "depth": 2})])
def test_repair_at_the_endpoints_changes_nothing(name, kw, helpers, digits):
    a, b = _pair(name, helpers, **kw)
    spec = build_spec(a)
    batches = list(iter_batches(digits[0], 500))
    merged = {alpha: interpolate_model(a, b, alpha) for alpha in (0.0, 1.0)}
    before = {alpha: copy.deepcopy(m.state_dict()) for alpha, m in merged.items()}
    repair_and_reset(a, b, spec, batches, repair=list(merged.items()))
    for alpha, ref in ((1.0, a), (0.0, b)):
        assert _rel_err(_outputs(merged[alpha], batches), _outputs(ref, batches)) < 1e-4
        state = merged[alpha].state_dict()
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in before[alpha].items()}


@pytest.mark.parametrize("name, kw", [("cnn_digits", {"width": 8}), ("mlp", {"width": 32, "depth": 2})])
def test_repair_interpolates_the_channel_statistics(name, kw, helpers, one_batch):
    alpha = 0.5
    a, b = _pair(name, helpers, **kw)
    spec = build_spec(a)
    merged = interpolate_model(a, b, alpha)
    shapes = {k: v.shape for k, v in merged.state_dict().items()}
    stats_a, stats_b = helpers.point_moments(a, spec, one_batch), helpers.point_moments(b, spec, one_batch)
    unrepaired = helpers.point_moments(merged, spec, one_batch)

    repair_and_reset(a, b, spec, one_batch, repair=[(alpha, merged)])

    assert {k: v.shape for k, v in merged.state_dict().items()} == shapes  # same architecture
    assert type(merged) is type(a)
    helpers.assert_repaired(spec, helpers.point_moments(merged, spec, one_batch), unrepaired,
                            helpers.interpolated_targets(spec, stats_a, stats_b, alpha))


def test_repair_of_a_map_merge_of_three_models_targets_the_mapped_endpoints(helpers, one_batch):
    """θ = Σ w_k T_k(θ_k) with an identity, a CCA and a permutation map: each channel's target is the weighted
    mean/std of what the mapped endpoints compute there (forward_k @ y_k, measured on the endpoints)."""
    a, b = _pair("cnn_digits", helpers, width=8)
    c = helpers.randomize_batchnorm(create_model("cnn_digits", seed=5, width=8), seed=6).eval()
    spec = build_spec(a)
    [cov_b] = group_covariances(a, [b], spec, one_batch)
    maps = [{}, cca_maps(cov_b)[0], permutation_maps(random_perms(spec, torch.Generator().manual_seed(3)))]
    weights = (0.2, 0.3, 0.5)
    merged = merge_models_with_maps([a, b, c], weights, maps)
    before = helpers.point_moments(merged, spec, one_batch)

    repair_many([a, b, c], spec, one_batch, repair=[RepairTarget(merged, weights, maps)])

    ends = [tap_model(m, [p.tap.name for p in spec.repair_points]).eval() for m in (a, b, c)]
    with torch.no_grad():
        feats = [e(one_batch[0].x)[1] for e in ends]
    targets = {}
    for p in spec.repair_points:
        t_mean, t_std = 0.0, 0.0
        for w, f, m in zip(weights, feats, maps):
            y = as_samples(f[p.tap.name], p.tap.channel_dim).double()
            if p.tap.group in m:
                y = y @ m[p.tap.group].forward.double().T
            t_mean, t_std = t_mean + w * y.mean(0), t_std + w * y.std(0, unbiased=False)
        targets[p.tap.name] = t_mean, t_std
    helpers.assert_repaired(spec, helpers.point_moments(merged, spec, one_batch), before, targets)


def test_repair_through_permutation_maps_is_repair_of_the_aligned_model(helpers, digits):
    a, b = _pair("cnn_digits", helpers, width=8)
    spec = build_spec(a)
    perms = random_perms(spec, torch.Generator().manual_seed(0))
    batches = list(iter_batches(digits[0], 300))
    aligned = interpolate_model(a, permute_model(b, spec, perms), 0.3)
    mapped = copy.deepcopy(aligned)
    repair_and_reset(a, permute_model(b, spec, perms), spec, batches, repair=[(0.3, aligned)])
    repair_many([a, b], spec, batches, repair=[RepairTarget(mapped, (0.3, 0.7), [{}, permutation_maps(perms)])])
    want, got = aligned.state_dict(), mapped.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_reset_recomputes_batchnorm_statistics_from_the_data(helpers, one_batch):
    a, b = _pair("cnn_digits", helpers, width=8)
    spec = build_spec(a)
    model = copy.deepcopy(a)

    # the oracle: each BatchNorm's input in a train-mode forward (upstream BNs normalize with batch stats)
    probe = copy.deepcopy(a).train()
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, key=n: seen.__setitem__(key, args[0].detach()))
             for n, m in probe.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        probe(one_batch[0].x)
    for h in hooks:
        h.remove()

    repair_and_reset(a, b, spec, one_batch, reset=[model])

    assert not model.training
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert bns.keys() == seen.keys() and len(bns) == 3
    for n, m in bns.items():
        s = as_samples(seen[n], 1).double()
        torch.testing.assert_close(m.running_mean.double(), s.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.running_var.double(), s.var(0, unbiased=True), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(m.running_mean, a.get_submodule(n).running_mean)  # it did change
    assert torch.equal(model.features[0].weight, a.features[0].weight)  # RESET leaves weights alone


# -- the sweep -------------------------------------------------------------------------------------------------

def _train(seed, train):
    model = create_model("cnn_digits", width=16, seed=seed)
    train_model(model, train, TrainConfig(epochs=6, batch_size=64, lr=0.05, seed=seed), progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def trained_pair(digits):
    return _train(0, digits[0]), _train(1, digits[0])


@pytest.fixture(scope="module")
def sweep(trained_pair, digits):
    a, b = trained_pair
    return run_sweep(a, b, digits[0], {"test": digits[1]})


def _row(result, method, alpha):
    [row] = [r for r in result.rows if r["method"] == method and r["alpha"] == alpha and r["split"] == "test"]
    return row


def test_sweep_repair_beats_the_naive_average(sweep):
    naive, repaired = _row(sweep, "naive", 0.5), _row(sweep, "permuted+repair", 0.5)
    assert repaired["accuracy"] > naive["accuracy"]
    assert repaired["loss"] < naive["loss"]


def test_sweep_counts_one_pass_per_purpose(sweep):
    assert sweep.passes == {"matching": 1, "repair/reset": 1, "evaluation": 1}
    assert sweep.methods == ["naive", "permuted", "permuted+repair", "permuted+reset"]
    assert len(sweep.rows) == 4 * 21


def test_sweep_endpoint_rows_equal_the_endpoint_evaluations(sweep):
    end = {e["model"]: e for e in sweep.endpoints if e["split"] == "test"}
    # aligning B does not change what it computes
    assert end["B aligned"]["accuracy"] == end["B"]["accuracy"]
    assert end["B aligned"]["loss"] == pytest.approx(end["B"]["loss"], rel=1e-5)
    for method, alpha, ref in (("naive", 1.0, "A"), ("permuted", 1.0, "A"),
                               ("naive", 0.0, "B"), ("permuted", 0.0, "B aligned")):
        row = _row(sweep, method, alpha)  # the merged model IS the endpoint, bit for bit
        assert (row["loss"], row["accuracy"]) == (end[ref]["loss"], end[ref]["accuracy"]), (method, alpha)
    # REPAIR at an endpoint is the identity up to rounding. (RESET is not: it re-estimates A's/B's BatchNorm
    # statistics from the data, which training's running averages only approximate.)
    for alpha, ref in ((1.0, "A"), (0.0, "B aligned")):
        row = _row(sweep, "permuted+repair", alpha)
        assert row["accuracy"] == end[ref]["accuracy"]
        assert row["loss"] == pytest.approx(end[ref]["loss"], rel=1e-4)


def test_sweep_refuses_two_architectures(trained_pair, digits):
    a, _ = trained_pair
    for other in (create_model("mlp"), create_model("cnn_digits", width=8)):
        with pytest.raises(ArchitectureError) as exc:
            run_sweep(a, other, digits[0], {"test": digits[1]})
        assert "\n" not in str(exc.value)


def test_sweep_with_map_methods(trained_pair, digits):
    """CCA / OT / regression merges run in the same harness: one extra statistics pass, one REPAIR pass for all
    methods, α = 1 is model A (REPAIRed or not), and REPAIR towards the mapped endpoints helps every map merge."""
    a, b = trained_pair
    maps = ("cca", "ot", "regression")
    methods = ("naive", "permuted", *maps, *(f"{m}+repair" for m in maps))
    res = run_sweep(a, b, digits[0], {"test": digits[1]},
                    SweepConfig(alphas=[0.0, 0.5, 1.0], methods=methods, batch_size=len(digits[0])))
    assert res.passes == {"matching": 1, "map statistics": 1, "repair/reset": 1, "evaluation": 1}
    rows = {(r["method"], r["alpha"]): r for r in res.rows}
    end_a = next(e for e in res.endpoints if e["model"] == "A")
    for m in maps:
        for method in (m, f"{m}+repair"):
            assert rows[method, 1.0]["loss"] == pytest.approx(end_a["loss"], rel=1e-4), method
        assert rows[m, 0.5]["accuracy"] > rows["naive", 0.5]["accuracy"]
        assert rows[f"{m}+repair", 0.5]["loss"] < rows[m, 0.5]["loss"], m
