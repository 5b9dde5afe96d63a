"""Oracles for weight matching (Git Re-Basin Algorithm 1), MergeMany (Algorithm 3) and ZipIt!'s greedy matching.

Each algorithm is written here literally from its paper — Ainsworth et al. 2023 (Git Re-Basin) Algorithms 1
and 3, Stoica et al. 2024 (ZipIt!) Sec. 4.3 with the edge cases of the authors' matching code — slowly and
without the library's helpers, and compared with the library on *trained, non-permuted* digit CNNs. A permuted
copy of one model cannot tell these algorithms from wrong ones; trained pairs can.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from mergescope.align import merge_many_matching, weight_matching
from mergescope.align.covariance import JointMoments, group_covariances
from mergescope.data import iter_batches, load_digits
from mergescope.merge.zipit import zip_features
from mergescope.perm import apply_permutation, build_spec

# cnn_digits' three convs (its permutation groups, in graph order) and the BatchNorm after each, by hand
CNN = {True: (("features.0", "features.3", "features.7"),
              {"features.0": "features.1", "features.3": "features.4", "features.7": "features.8"}),
       False: (("features.0", "features.2", "features.5"), {})}  # batchnorm=False
CONVS, BNS = CNN[True]
BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def _float64(model) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 1 (PermutationCoordinateDescent), for cnn_digits written by hand.
# A permutation p of a layer's channels means: permuted-B channel i is B's channel p[i].


def _permute_cnn(b: dict[str, np.ndarray], p: dict[str, np.ndarray], bn: bool = True) -> dict[str, np.ndarray]:
    """B with every layer's output channels (and the next layer's input channels) permuted by ``p``."""
    out = dict(b)
    convs, bns = CNN[bn]
    for prev, g in zip((None, *convs), convs):
        w = b[f"{g}.weight"][p[g]]  # output channels
        out[f"{g}.weight"] = w if prev is None else w[:, p[prev]]  # input channels
        for key in BN_KEYS if g in bns else ():
            out[f"{bns[g]}.{key}"] = b[f"{bns[g]}.{key}"][p[g]]
        if not bns:
            out[f"{g}.bias"] = b[f"{g}.bias"][p[g]]
    cls = b["classifier.weight"].reshape(10, -1, 4)  # flatten: channel c owns inputs 4c … 4c+3
    out["classifier.weight"] = cls[:, p[convs[-1]]].reshape(10, -1)
    return out


def _cost(a: dict[str, np.ndarray], b: dict[str, np.ndarray], p: dict[str, np.ndarray], g: str,
          bn: bool = True) -> np.ndarray:
    """Algorithm 1's LAP matrix of layer ``g``: W_ℓ^A P_{ℓ−1} W_ℓ^Bᵀ + W_{ℓ+1}^Aᵀ P_{ℓ+1} W_{ℓ+1}^B + the BN terms."""
    convs, bns = CNN[bn]
    i = convs.index(g)
    w_a, w_b = a[f"{g}.weight"], b[f"{g}.weight"]
    if i > 0:
        w_b = w_b[:, p[convs[i - 1]]]  # P_{ℓ−1} on B's input channels
    cost = np.einsum("icxy,jcxy->ij", w_a, w_b)
    if not bns:
        cost += np.outer(a[f"{g}.bias"], b[f"{g}.bias"])
    for key in BN_KEYS if g in bns else ():
        cost += np.outer(a[f"{bns[g]}.{key}"], b[f"{bns[g]}.{key}"])
    if i + 1 < len(convs):
        nxt = convs[i + 1]
        cost += np.einsum("oixy,ojxy->ij", a[f"{nxt}.weight"], b[f"{nxt}.weight"][p[nxt]])  # P_{ℓ+1} on outputs
    else:
        cls_a, cls_b = a["classifier.weight"].reshape(10, -1, 4), b["classifier.weight"].reshape(10, -1, 4)
        cost += np.einsum("kis,kjs->ij", cls_a, cls_b)
    return cost


def _objective(a: dict[str, np.ndarray], b_permuted: dict[str, np.ndarray], bn: bool = True) -> float:
    """vec(Θ_A) · vec(π(Θ_B)) over every weight a permutation moves."""
    convs, bns = CNN[bn]
    keys = [f"{g}.weight" for g in convs] + ["classifier.weight"]
    keys += [f"{x}.{k}" for x in bns.values() for k in BN_KEYS] if bns else [f"{g}.bias" for g in convs]
    return float(sum((a[k] * b_permuted[k]).sum() for k in keys))


def _algorithm1(a, b, seed: int, sweeps: int | None = None, bn: bool = True):
    """P_ℓ ← I; repeat: for ℓ in RandomPermutation(layers): P_ℓ ← SolveLAP(cost_ℓ); until no P_ℓ changes.

    The random order of sweep k: the k-th ``permutation`` of ``numpy.random.default_rng(seed)`` (the library's
    documented protocol, so that the same seed gives the same descent). Returns (p, sweeps run, last costs)."""
    convs = CNN[bn][0]
    p = {g: np.arange(len(a[f"{g}.weight"])) for g in convs}
    rng = np.random.default_rng(seed)
    for sweep in itertools.count(1):
        changed = False
        for li in rng.permutation(len(convs)):
            g = convs[li]
            cost = _cost(a, b, p, g, bn)
            rows, cols = linear_sum_assignment(cost, maximize=True)
            if cost[rows, cols].sum() > cost[rows, p[g]].sum():
                p[g], changed = cols, True
        if not changed or sweep == sweeps:
            break
    return p, sweep, {g: _cost(a, b, p, g, bn) for g in convs}


@pytest.mark.parametrize("batchnorm", [True, False])
@pytest.mark.parametrize("seed", [0, 3])
def test_weight_matching_is_algorithm_1(trained_digits, batchnorm, seed):
    kw = {"width": 16} if batchnorm else {"width": 16, "batchnorm": False}
    model_a, model_b = trained_digits("cnn_digits", 0, **kw), trained_digits("cnn_digits", 1, **kw)
    spec = build_spec(model_a)
    convs = CNN[batchnorm][0]
    assert tuple(spec.groups) == convs
    a, b = _float64(model_a), _float64(model_b)
    want, sweeps, costs = _algorithm1(a, b, seed, bn=batchnorm)
    assert sweeps >= 3  # a real descent: layers moved after the first sweep
    got = weight_matching(model_a.state_dict(), model_b.state_dict(), spec, seed=seed)
    for g in convs:
        np.testing.assert_array_equal(got.perms[g].numpy(), want[g], err_msg=g)
        np.testing.assert_allclose(got.similarity[g], costs[g], rtol=1e-4, atol=1e-4 * np.abs(costs[g]).max())
    b_perm = apply_permutation(model_b.state_dict(), spec, got.perms)
    assert _objective(a, {k: v.double().numpy() for k, v in b_perm.items()}, batchnorm) == pytest.approx(
        _objective(a, _permute_cnn(b, want, batchnorm), batchnorm), rel=1e-6)


def test_one_sweep_of_weight_matching_stops_short_of_convergence(trained_digits):
    model_a, model_b = trained_digits("cnn_digits", 0, width=16), trained_digits("cnn_digits", 1, width=16)
    spec = build_spec(model_a)
    a, b = _float64(model_a), _float64(model_b)
    one, _, _ = _algorithm1(a, b, seed=0, sweeps=1)
    full, _, _ = _algorithm1(a, b, seed=0)
    got_one = weight_matching(model_a.state_dict(), model_b.state_dict(), spec, seed=0, max_iter=1)
    got_full = weight_matching(model_a.state_dict(), model_b.state_dict(), spec, seed=0)
    assert all(np.array_equal(got_one.perms[g].numpy(), one[g]) for g in CONVS)
    objective = {name: _objective(a, _permute_cnn(b, {g: r.perms[g].numpy() for g in CONVS}))
                 for name, r in (("one", got_one), ("full", got_full))}
    assert objective["one"] < objective["full"] - 1e-6 * abs(objective["full"])
    assert objective["full"] == pytest.approx(_objective(a, _permute_cnn(b, full)), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 3 (MergeMany): the outer loop written out; the inner solver is the library's weight matching.


def _algorithm3(states: list[dict[str, torch.Tensor]], spec, seed: int):
    """repeat: for i in RandomPermutation(N): Θ' ← mean of the other (current) Θ_j; Θ_i ← WM(Θ', Θ_i);
    until no Θ_i got closer to its Θ' in a round. Random draws: the library's documented protocol (one
    generator; per round the order, then per model in that order its weight-matching seed). Returns the final
    (permuted) states and the number of rounds."""
    theta = [{k: s[k].float() for k in spec.param_axes} for s in states]
    n = len(theta)
    rng = np.random.default_rng(seed)
    for rounds in itertools.count(1):
        progress = False
        for i in rng.permutation(n):
            others = [theta[j] for j in range(n) if j != i]
            target = {k: sum(o[k] for o in others) / (n - 1) for k in theta[i]}
            before = sum(((target[k].double() - theta[i][k].double()) ** 2).sum() for k in target) ** 0.5
            match = weight_matching(target, theta[i], spec, seed=int(rng.integers(2**31)))
            theta[i] = apply_permutation(theta[i], spec, match.perms)
            after = sum(((target[k].double() - theta[i][k].double()) ** 2).sum() for k in target) ** 0.5
            progress = progress or after < before - 1e-12
        if not progress:
            return theta, rounds


def _read_perms(original: dict[str, torch.Tensor], final: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The permutations that took ``original`` to ``final``, read off each conv's weight rows (exact copies)."""
    perms: dict[str, np.ndarray] = {}
    for prev, g in zip((None, *CONVS), CONVS):
        w, w_final = original[f"{g}.weight"].float(), final[f"{g}.weight"]
        if prev is not None:
            w = w[:, perms[prev]]  # the original's input channels in their final order
        perms[g] = np.array([next(j for j in range(len(w)) if torch.equal(w[j], row)) for row in w_final])
    return perms


def test_merge_many_is_algorithm_3(trained_digits):
    models = [trained_digits("cnn_digits", s, width=16) for s in range(3)]
    spec = build_spec(models[0])
    states = [m.state_dict() for m in models]
    final, rounds = _algorithm3(states, spec, seed=0)
    assert rounds >= 3  # models moved again after the first round: each round starts where the last one ended
    got = merge_many_matching(states, spec, seed=0)
    for k, (state, result) in enumerate(zip(states, got)):
        want = _read_perms(state, final[k])
        for g in CONVS:
            np.testing.assert_array_equal(result.perms[g].numpy(), want[g], err_msg=f"model {k}, {g}")


# ---------------------------------------------------------------------------------------------------------------
# ZipIt! (Sec. 4.3): greedy matching of the concatenated features [A; B] on their correlation matrix.


def _zipit_greedy(corr: np.ndarray, c: int, a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """Merge the most similar pair of current features until c remain; returns (merge M, unmerge U).

    After a merge the new feature's similarity to each other feature is the min of the two merged features',
    times a (a ≤ 0: unpenalized, but never again with a feature of the models it came from). Each model may
    merge within itself int(b·c/2) times: checked after each within-model merge, which then, once the budget is
    ≤ 0, blocks all pairs of that model's features. The matrix shrinks: the merged feature takes the place of
    its lower-index member (and that member's model), the other one is deleted."""
    s = corr.astype(np.float64).copy()
    np.fill_diagonal(s, -np.inf)
    members = [[f] for f in range(2 * c)]
    model = [0] * c + [1] * c
    budget = [int(b * c / 2 + 1e-9)] * 2
    while len(members) > c:
        i, j = sorted(np.unravel_index(np.argmax(s), s.shape))
        assert s[i, j] > -np.inf  # every case tested here always has an allowed pair
        members[i] = members[i] + members[j]
        row = np.minimum(s[i], s[j])
        if a > 0:
            row = row * a
        else:
            row[[k for k in range(len(model)) if model[k] in (model[i], model[j])]] = -np.inf
        s[i, :], s[:, i] = row, row
        s[i, i] = -np.inf
        within = model[i] == model[j]
        s = np.delete(np.delete(s, j, axis=0), j, axis=1)
        del members[j], model[j]
        if within:
            budget[model[i]] -= 1
            if budget[model[i]] <= 0:
                same = [k for k in range(len(model)) if model[k] == model[i]]
                s[np.ix_(same, same)] = -np.inf
    unmerge = np.zeros((2 * c, c))
    for col, group in enumerate(members):
        unmerge[group, col] = 1.0
    merge = unmerge.T / unmerge.sum(0)[:, None]  # the mean of each merged feature's members
    return merge, unmerge


@pytest.fixture(scope="module")
def zip_stats(trained_digits):
    model_a, model_b = trained_digits("cnn_digits", 0, width=16), trained_digits("cnn_digits", 1, width=16)
    spec = build_spec(model_a)
    [stats] = group_covariances(model_a, [model_b], spec, iter_batches(load_digits("train"), 500))
    return stats


@pytest.mark.parametrize("a, b", [(0.3, 0.125), (0.3, 0.5), (1.0, 0.25), (0.0, 0.125), (0.3, 0.0), (0.0, 0.0)])
def test_zipit_is_the_papers_greedy_matching(zip_stats, a, b):
    grew, within = 0, 0
    for g, st in zip_stats.items():
        c = st.size_a
        want_m, want_u = _zipit_greedy(st.correlation(constants_match=True).numpy(), c, a, b)
        got_m, got_u = zip_features(st, alpha=0.5, a=a, b=b)
        np.testing.assert_array_equal(got_u.numpy(), want_u, err_msg=g)
        np.testing.assert_allclose(got_m.numpy(), want_m, atol=1e-12, err_msg=g)
        grew += int((want_u.sum(0) > 2).sum())  # merged features of three or more members
        within += int((want_u[:c].sum(0) >= 2).sum() + (want_u[c:].sum(0) >= 2).sum())
    assert within > 0  # the budget was used: the test sees within-model merges ...
    if a != 0.0:
        assert grew > 0  # ... and re-merges


def _joint(features_a: torch.Tensor, features_b: torch.Tensor) -> JointMoments:
    st = JointMoments()
    st.update(features_a.double(), features_b.double())
    return st


def _features(n: int = 400, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_zipit_budget_zero_still_allows_one_merge_within_each_model():
    """b = 0: the reference checks the budget only after a within-model merge, so A's two near-copies merge."""
    x = _features()
    fa = torch.stack([x[:, 0], x[:, 0] + 0.05 * x[:, 1], x[:, 2]], 1)  # A0 ≈ A1
    fb = torch.stack([x[:, 3], x[:, 4], x[:, 5]], 1)
    _, u = zip_features(_joint(fa, fb), a=0.3, b=0.0)
    assert torch.equal(u[0], u[1])  # one merged feature holds both


def test_zipit_a_zero_blocks_only_the_origin_models_features():
    """a = 0: after an A–A merge the merged feature can still take B's twin; after an A–B merge it is done."""
    x = _features()
    fa = torch.stack([x[:, 0], x[:, 0] + 0.05 * x[:, 1], x[:, 2]], 1)  # A0 ≈ A1
    fb = torch.stack([x[:, 0] + 0.2 * x[:, 3], x[:, 4], x[:, 5]], 1)  # B0 ≈ A0 too, a little less
    _, u = zip_features(_joint(fa, fb), a=0.0, b=1.0)
    assert u[:, 0].nonzero().flatten().tolist() == [0, 1, 3]  # A0, A1, then B0 (columns: B0 is feature 3)
    fb = torch.stack([x[:, 0] + 0.01 * x[:, 3], x[:, 0] + 0.3 * x[:, 4], x[:, 5]], 1)  # B0 ≈ A0 first, B1 too
    _, u = zip_features(_joint(fa, fb), a=0.0, b=1.0)
    assert u[:, 0].nonzero().flatten().tolist() == [0, 3]  # A0–B0, and nothing joins them afterwards
