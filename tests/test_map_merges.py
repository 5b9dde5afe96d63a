"""Merging with maps: permutation maps are permutation merging; exact rewrites stay exact; every map-based method
(CCA, OT, regression, ZipIt!) merging a model with a permuted copy of itself returns the model's function."""
from __future__ import annotations

import copy
import types

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from mergescope.align.covariance import group_covariances
from mergescope.data import iter_batches, load_digits, subset_per_class
from mergescope.errors import ArchitectureError
from mergescope.merge import interpolate_model, repair_many
from mergescope.merge.cca import cca_maps
from mergescope.merge.maps import (
    ChannelMap,
    map_layout,
    map_model,
    merge_models_with_maps,
    merge_with_maps,
    permutation_maps,
)
from mergescope.merge.methods import AlignInputs, get_merge_method
from mergescope.merge.ot import ot_maps, sinkhorn
from mergescope.merge.regression_merge import regression_maps
from mergescope.merge.zipit import zip_features, zipit_merge
from mergescope.models import create_model
from mergescope.perm import build_spec, permute_model, random_perms

MODELS = [("cnn_digits", {"width": 8}), ("mlp", {"width": 32, "depth": 2})]


@pytest.fixture(scope="module")
def batches():
    """200 training digits (20 per class), two batches: statistics and outputs on the same images."""
    train = load_digits("train")
    return list(iter_batches(train, 100, ids=subset_per_class(train.targets, 20)))


def _model(name, kw, helpers, seed=0):
    return helpers.randomize_batchnorm(create_model(name, seed=seed, **kw), seed=seed + 2).eval()


def _rel_err(model, ref, x):
    with torch.no_grad():
        y, want = model.eval()(x), ref.eval()(x)
    return ((y - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("name, kw", MODELS + [("resnet20", {"width": 1})])
def test_permutation_maps_are_permutation_merging_bit_for_bit(name, kw, helpers):
    a, b = _model(name, kw, helpers, 0), _model(name, kw, helpers, 1)
    spec = build_spec(a)
    perms = random_perms(spec, torch.Generator().manual_seed(0))
    want = interpolate_model(a, permute_model(b, spec, perms), 0.3).state_dict()
    got = merge_with_maps(a, b, permutation_maps(perms), 0.3, map_layout(a, spec)).state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("name, kw", MODELS + [("resnet20", {"width": 1})])
def test_positively_scaled_permutations_keep_the_function(name, kw, helpers):
    """P·diag(s), s > 0, commutes with ReLU and max-pooling but is not a permutation: it goes through the
    general path (BatchNorm refolded, flatten blocks mapped block by block, residual groups) and must be exact."""
    b = _model(name, kw, helpers, 1)
    spec = build_spec(b)
    g = torch.Generator().manual_seed(1)
    maps = {}
    for gname, group in spec.groups.items():
        t = torch.zeros(group.size, group.size, dtype=torch.float64)
        t[torch.arange(group.size), torch.randperm(group.size, generator=g)] = 0.5 + torch.rand(
            group.size, generator=g, dtype=torch.float64)
        maps[gname] = ChannelMap(t)  # inverse: the pseudo-inverse
    x = helpers.random_images(name, 16)
    assert _rel_err(map_model(b, maps), b, x) < 1e-5


def _mixed_pair():
    """A net with no nonlinearity after its first layer, and a copy whose first group is mixed by M."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    a.input_size = (1, 8, 8)
    m = torch.eye(12, dtype=torch.float64) + 0.3 * torch.randn(12, 12, generator=torch.Generator().manual_seed(3),
                                                                dtype=torch.float64)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    state["1.weight"] = (m @ state["1.weight"].double()).float()
    state["1.bias"] = (m @ state["1.bias"].double()).float()
    state["2.weight"] = (state["2.weight"].double() @ torch.linalg.inv(m)).float()
    b = copy.deepcopy(a)
    b.load_state_dict(state)
    return a, b, m


def test_general_maps_on_a_linear_group_are_exact(batches):
    a, b, m = _mixed_pair()
    spec = build_spec(a)
    x = torch.cat([bt.x for bt in batches])
    exact = merge_with_maps(a, b, {"1": ChannelMap(torch.linalg.inv(m), m)}, 0.5)
    assert _rel_err(exact, a, x) < 1e-5
    [stats] = group_covariances(a, [b], spec, batches, groups=["1"])
    maps, _ = regression_maps(stats)  # the regression finds M⁻¹ itself
    assert (maps["1"].forward - torch.linalg.inv(m)).abs().max() < 1e-4
    assert _rel_err(merge_with_maps(a, b, maps, 0.5), a, x) < 1e-4


def _method_merges(a, b, spec, batches):
    layout = map_layout(a, spec)
    [stats] = group_covariances(a, [b], spec, batches)
    out = {}
    for label, maps in [("cca", cca_maps(stats)[0]), ("ot exact", ot_maps(stats, reg=0)[0]),
                        ("ot sinkhorn", ot_maps(stats, reg=0.01, cost="correlation")[0]),
                        ("regression", regression_maps(stats)[0]),
                        ("regression 10% refit pinv", regression_maps(stats, 0.1, inverse="pinv")[0])]:
        out[label] = merge_with_maps(a, b, maps, 0.5, layout)
    zipped = zipit_merge(a, b, None, spec, layout=layout, stats=stats)
    out["zipit"] = zipped.model
    return out


@pytest.mark.parametrize("name, kw", MODELS)
def test_map_merges_of_a_permuted_copy_return_the_function(name, kw, helpers, batches):
    a = _model(name, kw, helpers)
    spec = build_spec(a)
    b = permute_model(a, spec, random_perms(spec, torch.Generator().manual_seed(5)))
    x = torch.cat([bt.x for bt in batches])
    merged = _method_merges(a, b, spec, batches)
    for label, model in merged.items():
        assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in a.state_dict().items()}
        assert _rel_err(model, a, x) < 1e-4, label


@pytest.mark.parametrize("method", ["cca", "regression"])
def test_many_models_into_one_reference_space(method, helpers, batches):
    """Through the registry: every other model mapped into the reference's space (the reference's maps are the
    identity), all three averaged with equal weights, give the reference's function back."""
    a = _model("cnn_digits", {"width": 8}, helpers)
    spec = build_spec(a)
    models = [a] + [permute_model(a, spec, random_perms(spec, torch.Generator().manual_seed(s))) for s in (1, 2)]
    x = torch.cat([bt.x for bt in batches])
    stats = group_covariances(a, models[1:], spec, batches)
    maps = get_merge_method(method)(AlignInputs(models, spec, stats={"observe": stats}))
    assert len(maps) == 3 and maps[0] == {} and all(m.keys() == spec.groups.keys() for m in maps[1:])
    merged = merge_models_with_maps(models, [1 / 3] * 3, maps, map_layout(a, spec))
    assert _rel_err(merged, a, x) < 1e-4


def test_sinkhorn_tends_to_the_optimal_permutation():
    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(12, 12, generator=gen, dtype=torch.float64)
    cost[torch.arange(12), torch.randperm(12, generator=gen)] -= 0.3  # a clear optimum, no near-ties
    rows, cols = linear_sum_assignment(cost.numpy())
    best = torch.zeros(12, 12, dtype=torch.float64)
    best[rows, cols] = 1 / 12
    gaps = []
    for reg in (0.1, 0.01, 0.001):
        plan, _ = sinkhorn(cost, reg)
        assert torch.allclose(plan.sum(1), torch.full((12,), 1 / 12, dtype=torch.float64), atol=1e-9)
        assert torch.allclose(plan.sum(0), torch.full((12,), 1 / 12, dtype=torch.float64), atol=1e-5)
        gaps.append((plan - best).abs().sum().item())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3


def test_zipit_merge_and_unmerge_matrices(helpers, batches):
    a, b = _model("cnn_digits", {"width": 8}, helpers, 0), _model("cnn_digits", {"width": 8}, helpers, 1)
    spec = build_spec(a)
    [stats] = group_covariances(a, [b], spec, batches)
    for st in stats.values():
        c = st.size_a
        merge, unmerge = zip_features(st, alpha=0.5, a=0.3, b=0.125)
        assert merge.shape == (c, 2 * c) and unmerge.shape == (2 * c, c)
        assert torch.equal(unmerge.sum(1), torch.ones(2 * c, dtype=torch.float64))  # each feature in one group
        assert torch.allclose(merge.sum(1), torch.ones(c, dtype=torch.float64))  # merged = members' mean
        assert torch.allclose(merge @ unmerge, torch.eye(c, dtype=torch.float64))
        _, few = zip_features(st, a=0.0, b=0.0)  # as the reference: b = 0 leaves one within-model merge per model
        assert (few[:c].sum(0) >= 2).sum() <= 1 and (few[c:].sum(0) >= 2).sum() <= 1


@pytest.mark.parametrize("name, kw", [("cnn_digits", {"width": 8}), ("resnet20", {"width": 1})])
def test_partial_zip_of_a_permuted_copy_is_the_model_at_every_cut(name, kw, helpers):
    """Zip up to each layer (for a ResNet also inside a block, where the shortcut crosses the cut too)."""
    a = _model(name, kw, helpers, 0)
    spec = build_spec(a)
    b = permute_model(a, spec, random_perms(spec, torch.Generator().manual_seed(4)))
    x = helpers.random_images(name, 64)
    batches = [types.SimpleNamespace(x=x)]
    # Every point of a stream: at its stage end alone (the default), channels the last block's ReLU silences on
    # these random images are constant, so which of them is which cannot be seen there (a ~3e-4 error upstream).
    [stats] = group_covariances(a, [b], spec, batches, points="all")
    for layer in spec.layers:
        res = zipit_merge(a, b, None, spec, stats=stats, up_to=layer)
        assert res.model.state_dict().keys() != a.state_dict().keys()  # extra layers (both heads): not A's
        assert _rel_err(res.model, a, x) < 1e-4, layer


@pytest.mark.parametrize("name, kw", [("cnn_digits", {"width": 8}), ("resnet20", {"width": 1})])
def test_partial_zip_ends_at_the_full_zip_and_starts_near_the_ensemble(name, kw, helpers):
    a, b = _model(name, kw, helpers, 0), _model(name, kw, helpers, 1)
    spec = build_spec(a)
    x = helpers.random_images(name, 64)
    [stats] = group_covariances(a, [b], spec, [types.SimpleNamespace(x=x)])
    full = zipit_merge(a, b, None, spec, stats=stats).model
    layers = list(spec.layers)
    last = zipit_merge(a, b, None, spec, stats=stats, up_to=layers[-1]).model
    assert _rel_err(last, full, x) < 1e-4  # after the last layer only linear heads remain
    with torch.no_grad():
        ensemble = 0.5 * a(x) + 0.5 * b(x)
        first = zipit_merge(a, b, None, spec, stats=stats, up_to=layers[0]).model(x)
        err_first = ((first - ensemble).abs().max() / ensemble.abs().max()).item()
        err_full = ((full(x) - ensemble).abs().max() / ensemble.abs().max()).item()
    assert err_first < err_full  # zipping only the first layer keeps more of the two models

    before = copy.deepcopy(a.state_dict())
    partial = zipit_merge(a, b, None, spec, stats=stats, up_to=layers[0]).model
    repair_many([a, b], spec, [types.SimpleNamespace(x=x)], reset=[partial])  # RESET reaches the heads too
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in before.items())  # ... copies, not A itself


def test_partial_zip_refuses_an_unknown_layer(helpers):
    a = _model("cnn_digits", {"width": 4}, helpers, 0)
    spec = build_spec(a)
    x = helpers.random_images("cnn_digits", 16)
    [stats] = group_covariances(a, [a], spec, [types.SimpleNamespace(x=x)])
    with pytest.raises(ArchitectureError, match="unknown layer 'nope'"):
        zipit_merge(a, a, None, spec, stats=stats, up_to="nope")
