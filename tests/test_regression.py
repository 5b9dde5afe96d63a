"""Regression alignment: known answers (a permuted copy, a copy mixed by a known matrix), streaming, sparsity."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mergescope.align.covariance import JointMoments, group_covariances
from mergescope.align.regression import (
    keep_count,
    regress_many,
    regression_fit,
    sparsify,
)
from mergescope.data import iter_batches, load_digits, subset_per_class
from mergescope.models import create_model
from mergescope.perm import build_spec, permute_model, random_perms


@pytest.fixture(scope="module")
def train():
    return load_digits("train")


@pytest.fixture(scope="module")
def subset_batches(train):
    """A small fitting subset (5 images per class) in batches of 20."""
    return list(iter_batches(train, 20, ids=subset_per_class(train.targets, 5)))


def _cnn(helpers):
    return helpers.randomize_batchnorm(create_model("cnn_digits", seed=0, width=8), seed=2).eval()


def _perm_matrix(p: torch.Tensor) -> torch.Tensor:
    """The map of the permuted copy into the original: a_j = b_i where p[i] = j, i.e. W[p[i], i] = 1."""
    w = torch.zeros(len(p), len(p), dtype=torch.float64)
    w[p, torch.arange(len(p))] = 1.0
    return w


def test_regression_onto_a_permuted_copy_finds_the_permutation(helpers, subset_batches):
    a = _cnn(helpers)
    spec = build_spec(a)
    perms = random_perms(spec, torch.Generator().manual_seed(0))
    b = permute_model(a, spec, perms)
    [res] = regress_many(a, [b], spec, subset_batches)
    assert res.samples["features.0"] == 50 * 64  # 5 images per class × 8×8 positions
    for g, fit in res.fits.items():
        want = _perm_matrix(perms[g])
        live = ~torch.isnan(fit.r2)
        assert live.sum() >= len(live) // 2, g  # not vacuous: most channels fire on the subset
        assert (fit.r2[live] - 1).abs().max() < 1e-6, g
        assert (fit.weight[live] - want[live]).abs().max() < 1e-4, g  # float32 activations
        [one] = [f for f in res.sweep[g] if f.label == "1% refit"]
        assert one.m == 1 and one.refit
        assert ((one.weight != 0).sum(1)[live] == 1).all(), g  # exactly one weight per channel...
        assert (one.weight[live].abs().argmax(1) == want[live].argmax(1)).all(), g  # ...the right one
        assert (one.weight[live] - want[live]).abs().max() < 1e-4, g
        assert (one.r2[live] - 1).abs().max() < 1e-6, g


def _mix(state: dict, out_w: str, out_b: str, in_w: str, m: torch.Tensor) -> dict:
    """Mix the output channels of one layer by ``m`` and un-mix them in the next layer's input."""
    state = {k: v.clone() for k, v in state.items()}
    w = state[out_w]
    state[out_w] = torch.tensordot(m, w.double(), dims=([1], [0])).float()
    state[out_b] = (m @ state[out_b].double()).float()
    nxt = state[in_w].double()  # (out, C, ...)
    state[in_w] = torch.tensordot(nxt, torch.linalg.inv(m), dims=([1], [0])).movedim(-1, 1).float()
    return state


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_regression_onto_a_mixed_copy_recovers_the_mixing_matrix(kind, train):
    """No nonlinearity on the mixed group, so B's features there are exactly M times A's: W = M⁻¹."""
    torch.manual_seed(0)
    if kind == "linear":
        a = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10))
        names = ("1.weight", "1.bias", "2.weight")
        a.input_size = (1, 8, 8)
        batches = list(iter_batches(train, 500))
    else:
        a = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 64, 10))
        names = ("0.weight", "0.bias", "1.weight")
        a.input_size = (1, 8, 8)
        batches = list(iter_batches(train, 20, ids=subset_per_class(train.targets, 5)))
    a.eval()
    spec = build_spec(a)
    group = names[0].split(".")[0]
    c = spec.groups[group].size
    g = torch.Generator().manual_seed(3)
    m = torch.eye(c, dtype=torch.float64) + 0.3 * torch.randn(c, c, generator=g, dtype=torch.float64)
    b = copy.deepcopy(a)
    b.load_state_dict(_mix(a.state_dict(), *names, m))
    x = torch.cat([bt.x for bt in batches])
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-4)  # mixing then un-mixing keeps the function
    [res] = regress_many(a, [b], spec, batches, fractions=None)
    fit = res.fits[group]
    assert (fit.weight - torch.linalg.inv(m)).abs().max() < 1e-4
    assert fit.intercept.abs().max() < 1e-4
    assert (fit.r2 - 1).abs().max() < 1e-5  # the scatter's blocks are float32 products (~1e-7 relative)


def test_streamed_statistics_do_not_depend_on_batching(helpers, train):
    a = _cnn(helpers)
    b = helpers.randomize_batchnorm(create_model("cnn_digits", seed=1, width=8), seed=3).eval()
    spec = build_spec(a)
    ids = subset_per_class(train.targets, 5)
    [small] = group_covariances(a, [b], spec, iter_batches(train, 7, ids=ids))
    [whole] = group_covariances(a, [b], spec, iter_batches(train, len(ids), ids=ids))
    for g in spec.groups:
        assert small[g].n == whole[g].n
        # float32 products of each batch summed in float64: entries agree to ~1e-7 of the largest variance
        scale = whole[g].scatter.diagonal().max().item()
        assert torch.allclose(small[g].scatter, whole[g].scatter, rtol=1e-5, atol=1e-6 * scale)
        f1, f2 = regression_fit(small[g]), regression_fit(whole[g])
        assert torch.allclose(f1.weight, f2.weight, atol=1e-5 * f2.weight.abs().max().item())  # via Σ_BB⁻¹
    # merging two halves is the same as seeing everything
    half1, half2 = JointMoments(), JointMoments()
    xa, xb = torch.randn(100, 3), torch.randn(100, 4)
    half1.update(xa[:30], xb[:30])
    half2.update(xa[30:], xb[30:])
    half1.merge(half2)
    full = JointMoments()
    full.update(xa, xb)
    assert torch.allclose(half1.scatter, full.scatter, atol=1e-10)
    assert torch.allclose(half1.swapped().sab, full.sab.T)


def test_least_squares_matches_a_direct_solve_and_sparsity_behaves():
    """Against torch.linalg.lstsq on the raw samples; refit ≥ no refit; R² grows with m; ridge shrinks."""
    g = torch.Generator().manual_seed(0)
    xb = torch.randn(400, 10, generator=g, dtype=torch.float64)
    true = torch.randn(6, 10, generator=g, dtype=torch.float64) * (torch.rand(6, 10, generator=g) < 0.3)
    xa = xb @ true.T + 0.5 + 0.1 * torch.randn(400, 6, generator=g, dtype=torch.float64)
    st = JointMoments()
    st.update(xa, xb)
    fit = regression_fit(st)
    design = torch.cat([xb, torch.ones(400, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(design, xa).solution.T  # (6, 11)
    assert torch.allclose(fit.weight, sol[:, :10], atol=1e-10)
    assert torch.allclose(fit.intercept, sol[:, 10], atol=1e-10)
    resid = xa - (xb @ fit.weight.T + fit.intercept)
    r2 = 1 - resid.pow(2).sum(0) / (xa - xa.mean(0)).pow(2).sum(0)
    assert torch.allclose(fit.r2, r2, atol=1e-10)

    assert [keep_count(f, 10) for f in (0.01, 0.05, 0.1, 0.25, 1.0)] == [1, 1, 1, 3, 10]
    prev = None
    for frac in (0.1, 0.2, 0.3, 0.5, 1.0):
        plain, refit = sparsify(st, fit, frac, False), sparsify(st, fit, frac, True)
        assert ((plain.weight != 0).sum(1) <= keep_count(frac, 10)).all()
        assert (refit.r2 >= plain.r2 - 1e-12).all()  # least squares on the support beats truncation
        if prev is not None:
            assert (refit.r2 >= prev - 1e-12).all()  # supports are nested: R² never drops as m grows
        prev = refit.r2
        # the refit solves the restricted normal equations: residual orthogonal to the kept columns
        resid = (xa - xa.mean(0)) - (xb - xb.mean(0)) @ refit.weight.T
        for i in range(6):
            kept = refit.weight[i] != 0
            assert (resid[:, i] @ (xb - xb.mean(0))[:, kept]).abs().max() < 1e-8
    ridged = regression_fit(st, ridge=1.0)
    assert ridged.weight.norm() < fit.weight.norm() and (ridged.r2 <= fit.r2 + 1e-12).all()
