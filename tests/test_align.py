"""Alignment recovers a known permutation; the streaming statistics behind it are exact and order-free."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from mergescope.align import activation_matching, weight_matching
from mergescope.align._assignment import best_permutation
from mergescope.data import iter_batches, load_digits
from mergescope.models import create_model, list_models
from mergescope.perm import (
    apply_permutation,
    build_spec,
    invert,
    permute_model,
    random_perms,
)
from mergescope.errors import NumericsError
from mergescope.perm.spec import PermAxis
from mergescope.probe.stats import CoMoments, Moments

ALL_MODELS = list_models()
# Weight matching of the torchvision classifiers with 4096-wide hidden layers is too slow for this suite: each
# time the last conv group moves, the 4096 x 4096 cost term of the first hidden layer is a product over 9216
# (AlexNet) or 25088 (VGG) inputs; one self-match took 23 s (tv_alexnet), 53 s (tv_vgg11) and 23 s
# (tv_vgg11_bn) of single-core CPU time. They are covered by activation matching below.
WEIGHT_MATCHING_TOO_SLOW = {"tv_alexnet", "tv_vgg11", "tv_vgg11_bn"}
WEIGHT_MATCHING_MODELS = [n for n in ALL_MODELS if n not in WEIGHT_MATCHING_TOO_SLOW]


@pytest.fixture(scope="module")
def digits_batches():
    return list(iter_batches(load_digits("train"), 500))


def _permuted_pair(model, example, seed=0):
    """(spec, q, A = model permuted by q); B = model. Aligning B to A must give back q."""
    spec = build_spec(model, example)
    q = random_perms(spec, torch.Generator().manual_seed(seed))
    return spec, q, permute_model(model, spec, q).eval()


@pytest.mark.parametrize("name", WEIGHT_MATCHING_MODELS)
def test_weight_matching_recovers_a_random_permutation(name, zoo, helpers):
    model = zoo(name)
    spec, q, model_a = _permuted_pair(model, helpers.random_images(name, 2))
    result = weight_matching(model_a.state_dict(), model.state_dict(), spec)
    assert result.method == "weight" and set(result.perms) == set(spec.groups)
    wrong = {g: int((result.perms[g] != q[g]).sum()) for g in spec.groups}
    assert not any(wrong.values()), f"channels matched wrongly per group: {wrong}"


def test_weight_matching_from_either_side_gives_inverse_permutations(zoo, helpers):
    model = zoo("resnet20")
    spec, q, model_a = _permuted_pair(model, helpers.random_images("resnet20", 2), seed=5)
    back = weight_matching(model.state_dict(), model_a.state_dict(), spec)
    assert all(torch.equal(back.perms[g], invert(q[g])) for g in spec.groups)


def _channel_rows(t, ax):
    """``t`` as one row per channel of the permuted axis (a channel spans ``ax.block`` consecutive entries)."""
    t = t.double().unflatten(ax.axis, (-1, ax.block))
    return t.movedim(ax.axis, 0).reshape(t.shape[ax.axis], -1)


@pytest.mark.parametrize("name, kw", [("cnn_digits", {"width": 8}), ("resnet20", {"width": 1})])
def test_weight_matching_stopped_early_returns_the_costs_of_its_permutations(name, kw):
    state_a = create_model(name, seed=0, **kw).state_dict()
    state_b = create_model(name, seed=1, **kw).state_dict()
    spec = build_spec(create_model(name, **kw))
    result = weight_matching(state_a, state_b, spec, max_iter=1)  # stops while permutations still move
    for g, group in spec.groups.items():
        others = apply_permutation(state_b, spec, {h: p for h, p in result.perms.items() if h != g})
        cost = sum(_channel_rows(state_a[ax.param], ax) @ _channel_rows(others[ax.param], ax).T for ax in group.axes)
        np.testing.assert_allclose(result.similarity[g], cost.numpy(), rtol=1e-4, atol=1e-4 * cost.abs().max().item(),
                                   err_msg=g)


# (shape, moved axis, other axis) of a conv (out / in), a linear reading a flattened 2x3 map (in-axis block 6), a
# weight whose moved axis has a block and comes after the other axis, one with a middle axis between the two, and
# one whose first axis is neither
LAYOUT_CASES = [((6, 4, 3, 3), (0, 1), (1, 1)), ((6, 4, 3, 3), (1, 1), (0, 1)), ((6, 4, 1, 1), (1, 1), (0, 1)),
                ((5, 4 * 6), (0, 1), (1, 6)), ((5, 4 * 6), (1, 6), (0, 1)), ((3, 5, 4 * 2), (2, 2), (0, 1)),
                ((3, 5, 4 * 2), (0, 1), (2, 2)), ((4, 6, 5, 3), (1, 1), (2, 1)), ((4, 6, 5, 3), (2, 1), (1, 1))]


@pytest.mark.parametrize("shape, moved, other", LAYOUT_CASES)
def test_weight_layouts_gather_the_channels_of_the_flat_weight(shape, moved, other):
    """Gathering the other axis's channels from a laid-out weight is exactly ``_flat(_gather(w, other, idx), moved)``
    (or its transpose), for either layout, blocks and kernels included."""
    wm = importlib.import_module("mergescope.align.weight_matching")
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ax, o_ax = PermAxis("w", *moved), PermAxis("w", *other)
    laid, rows = wm._layout(t, ax, o_ax)
    channels = shape[other[0]] // other[1]
    for idx in (torch.tensor([2, 0]), torch.arange(channels).flip(0), torch.arange(channels), None):
        want = wm._flat(t if idx is None else wm._gather(t, o_ax, idx), ax)
        got = wm._pick(laid, rows, idx)
        assert torch.equal(got.T if rows else got, want)
    # other-first for an input axis (the other axis first), channels-first otherwise; the weight's own memory for
    # an output axis and for a 1x1 conv's input axis, a copy elsewhere
    assert rows == (ax.axis != 0 and o_ax.axis == 0)
    assert (laid.data_ptr() == t.data_ptr()) == (ax.axis == 0 or shape == (6, 4, 1, 1))


@pytest.mark.parametrize("n, offset", [(1, 0.0), (7, 0.0), (64, 0.0), (64, 1e4), (300, -3.0)])
def test_lap_cost_has_the_optimum_of_the_similarity_exactly(n, offset):
    """The column-reduced float64 cost differs from ``-c`` by one exact constant per column, and minimizing it
    gives scipy's maximizer of ``c``."""
    wm = importlib.import_module("mergescope.align.weight_matching")
    c = (torch.randn(n, n, generator=torch.Generator().manual_seed(n)) + offset).float()
    cost = wm._lap_cost(c)
    assert cost.dtype == np.float64 and cost.flags.c_contiguous
    w = cost + c.double().numpy()  # w_j in every row
    assert np.array_equal(w, np.broadcast_to(w[0], w.shape))
    assert np.array_equal(w[0], (c - c.amax(1, keepdim=True)).amax(0).double().numpy())
    want = linear_sum_assignment(c.double().numpy(), maximize=True)[1]
    assert torch.equal(best_permutation(cost, maximize=False), torch.as_tensor(want))
    with pytest.raises(NumericsError, match="NaN or Inf"):
        best_permutation(wm._lap_cost(torch.where(torch.eye(n, dtype=torch.bool), float("nan"), c)), maximize=False)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_activation_matching_recovers_a_random_permutation(name, zoo, helpers, digits_batches):
    model = zoo(name)
    if name in helpers.DIGIT_MODELS:
        batches = digits_batches
    else:
        batches = helpers.image_batches(name, 8, 2)
    spec, q, model_a = _permuted_pair(model, batches[0].x[:2])
    result = activation_matching(model_a, model, spec, batches)
    assert result.method == "activation" and set(result.perms) == set(spec.groups)
    live_total, size_total = 0, 0
    for g in spec.groups:
        # A is B with its channels moved, so A's dead channels are exactly B's, moved.
        dead_b = torch.tensor(result.dead_b[g], dtype=torch.long)
        assert result.dead_a[g] == torch.isin(q[g], dead_b).nonzero().flatten().tolist()
        live = torch.ones(len(q[g]), dtype=torch.bool)
        live[result.dead_a[g]] = False
        wrong = (result.perms[g] != q[g]) & live
        assert not wrong.any(), f"group {g}: live channels {wrong.nonzero().flatten().tolist()} matched wrongly"
        if len(spec.groups[g].observe) == 1:  # (else averaged with places where the channel may be dead)
            assert np.allclose(result.matched_similarity(g)[live.numpy()], 1.0, atol=1e-4)
        live_total, size_total = live_total + int(live.sum()), size_total + len(live)
    assert live_total > size_total / 2  # the check covers most channels


# -- streaming statistics -----------------------------------------------------------------------------------

def _data(n=300, ca=5, cb=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, ca, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, ca, dtype=torch.float64) + 2
    b = a[:, :cb] * 0.7 + torch.randn(n, cb, generator=g, dtype=torch.float64) - 1  # correlated with a
    return a, b


def _moments(chunks):
    m = Moments()
    for c in chunks:
        m.update(c)
    return m


def _comoments(pairs):
    c = CoMoments()
    for a, b in pairs:
        c.update(a, b)
    return c


def _close(x, y, tol=1e-10):
    return torch.allclose(x, y, rtol=tol, atol=tol)


def test_moments_do_not_depend_on_batching_order_or_merging():
    a, _ = _data()
    one = _moments([a])
    assert one.n == len(a)
    assert _close(one.mean, a.mean(0)) and _close(one.var, a.var(0, unbiased=False))
    order = torch.randperm(len(a), generator=torch.Generator().manual_seed(1))
    for other in (_moments(a.split(7)), _moments(a[order].split(64)), _moments([a[:1], a[1:]])):
        assert other.n == one.n and _close(other.mean, one.mean) and _close(other.m2, one.m2)
    left, right = _moments(a[:120].split(50)), _moments(a[120:].split(33))
    left.merge(right)
    assert left.n == one.n and _close(left.mean, one.mean) and _close(left.m2, one.m2)


def test_comoments_do_not_depend_on_batching_order_or_merging():
    a, b = _data()
    one = _comoments([(a, b)])
    order = torch.randperm(len(a), generator=torch.Generator().manual_seed(2))
    candidates = [
        _comoments(zip(a.split(10), b.split(10))),
        _comoments(zip(a[order].split(37), b[order].split(37))),
    ]
    left, right = _comoments(zip(a[:100].split(30), b[:100].split(30))), _comoments([(a[100:], b[100:])])
    left.merge(right)
    candidates.append(left)
    for c in candidates:
        assert _close(c.cab, one.cab) and _close(c.a.m2, one.a.m2) and _close(c.b.mean, one.b.mean)
        assert _close(c.correlation(), one.correlation())
        assert all(torch.equal(x, y) for x, y in zip(c.dead(), one.dead()))


def test_correlation_equals_numpy_corrcoef():
    a, b = _data()
    corr = _comoments(zip(a.split(64), b.split(64))).correlation()
    expected = np.corrcoef(a.numpy(), b.numpy(), rowvar=False)[: a.shape[1], a.shape[1]:]
    assert corr.shape == (a.shape[1], b.shape[1])
    np.testing.assert_allclose(corr.numpy(), expected, rtol=1e-10, atol=1e-10)


def test_float32_statistics_agree_across_batchings_to_float32_precision():
    a, b = (t.float() for t in _data())
    one, many = _comoments([(a, b)]), _comoments(zip(a.split(16), b.split(16)))
    assert torch.allclose(many.correlation(), one.correlation(), atol=1e-6)
    assert torch.allclose(many.a.mean, one.a.mean, rtol=1e-6, atol=1e-6)


def test_dead_marks_constant_and_single_sample_channels_only():
    n = 40
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, 5, dtype=torch.float64)
    x[:, 0] = 3.0  # constant
    x[7, 1] = 2.5  # ReLU-like unit firing on one sample only
    x[:, 2] = -1.0
    x[30, 2] = -4.0  # constant but for one sample, below the constant
    x[[3, 9], 3] = torch.tensor([1.0, 2.0], dtype=torch.float64)  # two samples: informative
    x[:, 4] = torch.randn(n, generator=g, dtype=torch.float64)
    expected = [True, True, True, False, False]
    for chunks in ([x], x.split(6), x[torch.randperm(n, generator=g)].split(9)):
        c = _comoments((ch, ch) for ch in chunks)
        dead_a, dead_b = c.dead()
        assert dead_a.tolist() == expected and dead_b.tolist() == expected
    left, right = _comoments([(x[:8], x[:8])]), _comoments([(x[8:], x[8:])])
    left.merge(right)
    assert left.dead()[0].tolist() == expected
