"""Oracle tests of CCA merging (Horoi et al. 2024) and OT fusion (Singh & Jaggi 2020) on a TRAINED, NON-PERMUTED
digits pair (cnn_digits ×16, seeds 0 and 1, the digits' train split; OT on residual streams: ResNet20 ×1).

Written from the papers, not from the library: features are collected with plain forward hooks (post-activation
= the ReLU modules' outputs, pre-activation = the BatchNorm outputs), each conv channel's map flattened over
images × positions. CCA: population covariances, the ridge γ·I, symmetric square roots by eigendecomposition,
the SVD of the whitened cross-covariance and T = S_A^{1/2} U Vᵀ S_B^{-1/2}. OT: the Euclidean cost
‖a_i − b_j‖ between raw pre-activation vectors, the exact problem solved by ``linear_sum_assignment`` (equal
widths: a permutation) or by the LP ``scipy.optimize.linprog`` (unequal widths, uniform marginals), and the
barycentric maps Π/row sums, Πᵀ/column sums. A residual stream's pre-activation is its own: at the stage's last
block, the sum bn2(conv2(·)) + shortcut(x) that enters the block's final ReLU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment, linprog

from mergescope.align.covariance import JointMoments, group_covariances_at
from mergescope.data import iter_batches
from mergescope.merge.maps import ChannelMap, merge_with_maps
from mergescope.merge.ot import ot_map
from mergescope.merge.recipes import MAP_METHODS
from mergescope.perm import build_spec
from mergescope.studies.sweep import SweepConfig
from mergescope.studies.sweep import run as run_sweep

GROUPS = {"features.0": ("features.1", "features.2"),  # group -> (pre-activation module, post-activation module)
          "features.3": ("features.4", "features.5"),
          "features.7": ("features.8", "features.9")}


def _raw(model, x: torch.Tensor, names=tuple(n for pts in GROUPS.values() for n in pts)) -> dict[str, np.ndarray]:
    """Module name -> (samples, C) float64: its output over images × positions, channels last (forward hooks)."""
    modules = dict(model.named_modules())
    got = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o.detach().clone()))
               for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: t.double().movedim(1, -1).reshape(-1, t.shape[1]).numpy() for n, t in got.items()}


@pytest.fixture(scope="module")
def raw(digits_pair, digits_train):
    """Both models' raw features on every training image, and the library's statistics (one pass, both places)."""
    a, b = digits_pair
    x = torch.cat([bt.x for bt in iter_batches(digits_train, 500)])
    spec = build_spec(a)
    stats = group_covariances_at(a, [b], spec, iter_batches(digits_train, 500), ("observe", "preactivation"))
    return _raw(a, x), _raw(b, x), {place: per_model[0] for place, per_model in stats.items()}


# -- CCA --------------------------------------------------------------------------------------------------------

def _sqrt_and_inverse_sqrt(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e, v = np.linalg.eigh(s)
    return v @ np.diag(np.sqrt(e)) @ v.T, v @ np.diag(1 / np.sqrt(e)) @ v.T


def _cca_oracle(xa: np.ndarray, xb: np.ndarray, relative: bool) -> tuple[np.ndarray, np.ndarray]:
    """CCA merging's map of B into A and back, from the raw features (samples, C)."""
    n, ca = xa.shape
    da, db = xa - xa.mean(0), xb - xb.mean(0)
    saa, sbb, sab = da.T @ da / n, db.T @ db / n, da.T @ db / n  # population covariances
    ga = 0.1 * (np.trace(saa) / ca if relative else 1.0)
    gb = 0.1 * (np.trace(sbb) / xb.shape[1] if relative else 1.0)
    sa, sb = saa + ga * np.eye(ca), sbb + gb * np.eye(xb.shape[1])
    sa_h, sa_ih = _sqrt_and_inverse_sqrt(sa)
    sb_h, sb_ih = _sqrt_and_inverse_sqrt(sb)
    u, rho, vt = np.linalg.svd(sa_ih @ sab @ sb_ih)
    assert rho.min() > 1e-6  # the whitened cross-covariance is nonsingular: its polar factor U Vᵀ is unique
    return sa_h @ u @ vt @ sb_ih, sb_h @ vt.T @ u.T @ sa_ih


@pytest.mark.parametrize("base, relative", [("cca", False), ("cca_relative", True)])
def test_cca_map_is_the_papers_on_a_trained_pair(raw, base, relative):
    raw_a, raw_b, stats = raw
    maps = MAP_METHODS[base](stats)
    for group, (_, post) in GROUPS.items():
        forward, inverse = _cca_oracle(raw_a[post], raw_b[post], relative)
        got = maps[group]
        scale = np.abs(forward).max()
        # the library's scatter blocks are float32 products (~1e-7 of the largest variance); the whitening
        # Σ^-1/2 amplifies that by the covariances' condition number: ~1e-5 of the map's largest entry
        np.testing.assert_allclose(got.forward.numpy(), forward, atol=2e-4 * scale, err_msg=f"{base} {group}")
        np.testing.assert_allclose(got.inverse.numpy(), inverse, atol=2e-4 * np.abs(inverse).max(),
                                   err_msg=f"{base} {group}")


# -- OT fusion --------------------------------------------------------------------------------------------------

def _euclidean_cost(xa: np.ndarray, xb: np.ndarray) -> np.ndarray:
    """M_ij = ‖a_i − b_j‖₂ over the samples (raw values)."""
    return np.stack([np.sqrt(((xa - xb[:, [j]]) ** 2).sum(0)) for j in range(xb.shape[1])], axis=1)


def _lp_plan(cost: np.ndarray) -> np.ndarray:
    """min ⟨Π, M⟩ s.t. rows of Π sum to 1/n, columns to 1/m, Π ≥ 0 — an independent LP."""
    n, m = cost.shape
    rows = np.kron(np.eye(n), np.ones((1, m)))  # Σ_j Π_ij
    cols = np.kron(np.ones((1, n)), np.eye(m))  # Σ_i Π_ij
    res = linprog(cost.ravel(), A_eq=np.vstack([rows, cols]),
                  b_eq=np.concatenate([np.full(n, 1 / n), np.full(m, 1 / m)]), bounds=(0, None), method="highs")
    assert res.status == 0
    return res.x.reshape(n, m)


def test_ot_plan_is_exact_transport_of_preactivations_on_a_trained_pair(raw):
    raw_a, raw_b, stats = raw
    maps = MAP_METHODS["ot"](stats)
    for group, (pre, _) in GROUPS.items():
        cost = _euclidean_cost(raw_a[pre], raw_b[pre])
        rows, cols = linear_sum_assignment(cost)
        c = len(rows)
        perm = np.zeros((c, c))
        perm[rows, cols] = 1.0
        _, plan = ot_map(stats["preactivation"][group])
        np.testing.assert_allclose(plan.numpy(), perm / c, atol=1e-12, err_msg=group)
        assert torch.equal(maps[group].forward, torch.as_tensor(perm)), group  # exactly a permutation
        assert torch.equal(maps[group].inverse, torch.as_tensor(perm.T)), group


def test_ot_barycentric_maps_for_unequal_widths_on_a_trained_pair(raw):
    """B keeps 12 of its 16 channels: the plan is no permutation, rows and columns carry different masses."""
    raw_a, raw_b, _ = raw
    xa, xb = raw_a["features.1"], raw_b["features.1"][:, 2:14]
    plan = _lp_plan(_euclidean_cost(xa, xb))
    stats = JointMoments()
    stats.update(torch.from_numpy(xa), torch.from_numpy(xb))
    got, got_plan = ot_map(stats)
    np.testing.assert_allclose(got_plan.numpy(), plan, atol=1e-9)
    np.testing.assert_allclose(got.forward.numpy(), plan / plan.sum(1, keepdims=True), atol=1e-7)
    np.testing.assert_allclose(got.inverse.numpy(), (plan / plan.sum(0, keepdims=True)).T, atol=1e-7)
    assert np.allclose(got.forward.sum(1).numpy(), 1.0) and np.allclose(got.inverse.sum(1).numpy(), 1.0)


def test_sweep_merges_with_the_preactivation_transport_in_one_statistics_pass(digits_pair, raw, digits_train):
    a, b = digits_pair
    raw_a, raw_b, stats = raw
    res = run_sweep(a, b, digits_train, {}, SweepConfig(alphas=[0.5], methods=["ot", "cca"]))
    assert res.passes["map statistics"] == 1
    perms = {}
    for group, (pre, _) in GROUPS.items():
        rows, cols = linear_sum_assignment(_euclidean_cost(raw_a[pre], raw_b[pre]))
        perms[group] = torch.zeros(len(rows), len(rows), dtype=torch.float64)
        perms[group][rows, cols] = 1.0
    want = merge_with_maps(a, b, {g: ChannelMap(p, p.T) for g, p in perms.items()}, 0.5).state_dict()
    got = res.midpoint["ot"].state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


RESNET_PREACTIVATIONS = {  # group -> the modules whose outputs add up to its pre-activation (the ReLU's input)
    "conv1": ("layer1.2.bn2", "layer1.2.shortcut"),  # the stream of stage 1: its last block's residual sum
    "layer2.0.conv2": ("layer2.2.bn2", "layer2.2.shortcut"),
    "layer3.0.conv2": ("layer3.2.bn2", "layer3.2.shortcut"),
    **{f"layer{i}.{j}.conv1": (f"layer{i}.{j}.bn1",) for i in (1, 2, 3) for j in (0, 1, 2)},  # inside a block
}


def test_ot_transports_a_residual_streams_own_preactivation_on_a_trained_resnet(trained_digits, digits_train):
    """The permutation of each ResNet20 group is the exact OT plan of the Euclidean cost between the raw
    pre-activations — a residual stream's taken where it enters the ReLU at its stage's last block."""
    a, b = (trained_digits("resnet20", s, in_channels=1, width=1) for s in (0, 1))
    x = torch.cat([bt.x for bt in iter_batches(digits_train, 500)])
    names = [n for parts in RESNET_PREACTIVATIONS.values() for n in parts]
    raw_a, raw_b = _raw(a, x, names), _raw(b, x, names)
    spec = build_spec(a)
    assert set(spec.groups) == set(RESNET_PREACTIVATIONS)
    [stats] = group_covariances_at(a, [b], spec, iter_batches(digits_train, 500), ("preactivation",))["preactivation"]
    maps = MAP_METHODS["ot"]({"preactivation": stats})
    for group, parts in RESNET_PREACTIVATIONS.items():
        pre_a, pre_b = sum(raw_a[n] for n in parts), sum(raw_b[n] for n in parts)
        rows, cols = linear_sum_assignment(_euclidean_cost(pre_a, pre_b))
        perm = torch.zeros(len(rows), len(rows), dtype=torch.float64)
        perm[rows, cols] = 1.0
        assert torch.equal(maps[group].forward, perm), group
        assert torch.equal(maps[group].inverse, perm.T), group


# -- defaults are not their variants ----------------------------------------------------------------------------

def test_defaults_differ_from_their_named_variants(raw):
    _, _, stats = raw
    for default, variant in [("cca", "cca_relative"), ("ot", "ot_sinkhorn")]:
        got, other = MAP_METHODS[default](stats), MAP_METHODS[variant](stats)
        gap = max((got[g].forward - other[g].forward).abs().max().item() for g in GROUPS)
        assert gap > 0.05, (default, variant, gap)
    assert MAP_METHODS["ot"].at == "preactivation" and MAP_METHODS["ot_sinkhorn"].at == "observe"
