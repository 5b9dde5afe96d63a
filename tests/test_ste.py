"""Git Re-Basin's straight-through estimator (Ainsworth et al. 2023, Alg. 2) against the algorithm written out
by hand on a trained, non-permuted digits pair: free weights from A, each step projected onto B's permutations by
weight matching, the midpoint's loss differentiated through the projection as the identity (∂L/∂θ̃ = ½ ∂L/∂θ_mid),
SGD with momentum, the permutation of the lowest batch loss kept."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergescope.align import weight_matching
from mergescope.data import iter_batches, subset_per_class
from mergescope.errors import MergescopeError
from mergescope.merge.ste import straight_through_matching
from mergescope.perm import apply_permutation, build_spec, permute_model, random_perms


@pytest.fixture(scope="module")
def data(digits_train):
    """Four batches of 50 training digits."""
    return list(iter_batches(digits_train, 50, ids=subset_per_class(digits_train.targets, 20)))


def _by_hand(model_a, model_b, spec, data, epochs, lr, momentum):
    """Alg. 2, slowly: returns (the best step's permutations, every step's (loss, permutations))."""
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    names = [n for n, _ in model_a.named_parameters()]
    tilde = {n: state_a[n].clone() for n in names}
    velocity = {n: torch.zeros_like(t) for n, t in tilde.items()}
    steps = []
    for epoch in range(epochs):
        for batch in data:
            perms = weight_matching({**state_a, **tilde}, state_b, spec, seed=len(steps)).perms
            projected = apply_permutation(dict(state_b), spec, perms)
            mid = copy.deepcopy(model_a)
            mid.load_state_dict({k: (state_a[k] + projected[k]) / 2 if state_a[k].is_floating_point() else state_a[k]
                                 for k in state_a})
            mid.eval()
            for m in mid.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.train()
            loss = F.cross_entropy(mid(batch.x), batch.y)
            grads = torch.autograd.grad(loss, [dict(mid.named_parameters())[n] for n in names])
            for n, g in zip(names, grads):
                velocity[n] = momentum * velocity[n] + 0.5 * g  # the midpoint is ½ θ_A + ½ θ̂, ∂θ̂/∂θ̃ = I
                tilde[n] = tilde[n] - lr * velocity[n]
            steps.append((loss.item(), perms))
    best = min(range(len(steps)), key=lambda i: steps[i][0])  # the first of equal losses
    return steps[best][1], steps


def test_the_straight_through_estimator_follows_algorithm_2(trained_digits, data):
    a, b = trained_digits("cnn_digits", 0, width=16), trained_digits("cnn_digits", 1, width=16)
    spec = build_spec(a)
    want, steps = _by_hand(a, b, spec, data, epochs=3, lr=0.05, momentum=0.9)
    got = straight_through_matching(a, b, spec, lambda: data, epochs=3, lr=0.05, momentum=0.9)
    assert got.perms.keys() == want.keys()
    assert all(torch.equal(got.perms[g], want[g]) for g in want)
    distinct = {tuple(torch.cat([p[g] for g in sorted(p)]).tolist()) for _, p in steps}
    assert len(distinct) > 1  # the free weights moved the projection: more than plain weight matching
    best = min(range(len(steps)), key=lambda i: steps[i][0])
    assert 0 < best < len(steps) - 1  # the kept permutation is neither the first (weight matching's) nor the last


def test_a_permuted_copy_is_matched_back_and_bad_settings_are_named(trained_digits, data):
    a = trained_digits("cnn_digits", 0, width=16)
    spec = build_spec(a)
    perms = random_perms(spec, torch.Generator().manual_seed(0))
    got = straight_through_matching(a, permute_model(a, spec, perms), spec, lambda: data[:2], epochs=1)
    back = permute_model(permute_model(a, spec, perms), spec, got.perms)
    assert all(torch.equal(x, y) for x, y in zip(back.state_dict().values(), a.state_dict().values()))
    with pytest.raises(MergescopeError, match=r"^the straight-through estimator needs epochs ≥ 1 and lr > 0, got 0, "):
        straight_through_matching(a, a, spec, lambda: data, epochs=0)
    with pytest.raises(MergescopeError, match="got no batches"):
        straight_through_matching(a, a, spec, lambda: [])
