"""Aggregation and ensembles: known answers and oracles written from the papers' equations.

The workload is the task-vector one: a trained digits CNN (the base) fine-tuned twice, on classes 0-4 and on
classes 5-9 (a few SGD steps each), so the task vectors are real, differ and conflict in sign. Every oracle
below is the paper's equation in plain torch/Python, compared with the registry's method
(:meth:`mergescope.merge.methods.MergeMethod.merge`); the known answers are the issue's: the simple average is the
mean of the state dicts, TIES without trimming or sign conflict and DARE with p = 0 are task arithmetic, RegMean
of one model is that model and of two linear models the closed form solved by hand, Fisher averaging with equal
Fishers is the simple average, a greedy soup never scores below its best ingredient on the held-out split.
"""
from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

from mergescope.align import weight_matching
from mergescope.data import iter_batches, load_digits, subset_per_class
from mergescope.errors import MergescopeError
from mergescope.merge import ensemble, fisher, regmean, soups
from mergescope.merge.methods import AlignInputs, get_merge_method
from mergescope.perm import build_spec, permute_model, random_perms
from mergescope.train import TrainConfig, train_model


@pytest.fixture(scope="module")
def batches(digits_train):
    """200 training digits (20 per class) in two batches: the data of Fisher, RegMean and SWA."""
    return list(iter_batches(digits_train, 100, ids=subset_per_class(digits_train.targets, 20)))


@pytest.fixture(scope="module")
def tuned(trained_digits, digits_train):
    """(base, [fine-tune on classes 0-4, fine-tune on classes 5-9]): copies of one trained CNN, 2 epochs each."""
    base = trained_digits("cnn_digits", 0, width=16)
    out = []
    for seed, classes in enumerate(((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))):
        model = copy.deepcopy(base)
        ids = torch.as_tensor([i for i, t in enumerate(digits_train.targets) if int(t) in classes])
        train_model(model, digits_train, TrainConfig(epochs=2, batch_size=64, lr=0.05, schedule="constant",
                                                     warmup=0.0, seed=seed), progress=False, ids=ids)
        out.append(model.eval())
    return base, out


def _inputs(models, base=None, data=None, **kw) -> AlignInputs:
    return AlignInputs(list(models), build_spec(models[0]), base=base, data=data, **kw)


def _params(model) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def _close(got: dict, want: dict, keys, atol=1e-6) -> None:
    for k in keys:
        torch.testing.assert_close(got[k].double(), want[k].double(), rtol=1e-5, atol=atol, msg=k)


def _mean_by_hand(states, weights=None):
    """Σ_k w_k θ_k for every floating tensor, by hand (w: uniform by default)."""
    weights = weights or [1.0 / len(states)] * len(states)
    return {k: sum(w * s[k].double() for w, s in zip(weights, states)) for k in states[0]
            if states[0][k].is_floating_point()}


# -- simple averaging, FedAvg, SWA -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["average", "uniform_soup", "naive"])
def test_the_simple_average_is_the_mean_of_the_state_dicts(name, tuned):
    base, (a, b) = tuned
    models = [a, b, base]
    got = get_merge_method(name).merge(_inputs(models)).state_dict()
    states = [m.state_dict() for m in models]
    for k, v in states[0].items():
        if v.is_floating_point():
            torch.testing.assert_close(got[k], (states[0][k] + states[1][k] + states[2][k]) / 3, msg=k)
        else:
            assert torch.equal(got[k], v), k  # num_batches_tracked: the first model's (all weights equal)


def test_average_ignores_the_merge_weights_and_fedavg_weighs_by_sample_counts(tuned):
    base, (a, b) = tuned
    states = [a.state_dict(), b.state_dict()]
    avg = get_merge_method("average").merge(_inputs([a, b], weights=[0.9, 0.1])).state_dict()
    fed = get_merge_method("fedavg").merge(_inputs([a, b], sample_counts=[300, 100], weights=[0.1, 0.9])).state_dict()
    _close(avg, _mean_by_hand(states), _params(a))
    _close(fed, _mean_by_hand(states, [0.75, 0.25]), list(_mean_by_hand(states)))  # n_k / Σ n: 300/400, 100/400


def test_swa_is_the_mean_of_the_checkpoints_with_batchnorm_statistics_recomputed(tuned, batches):
    """Izmailov et al. 2018: the uniform mean of the checkpoints, then each BatchNorm's running mean and
    variance recomputed over the data — here by hand: the mean model in train-mode BatchNorm, and per layer the
    average over the batches of each batch's mean and unbiased variance of the layer's input."""
    base, (a, b) = tuned
    models = [base, a, b]
    got = get_merge_method("swa").merge(_inputs(models, data=lambda: batches))
    mean = _mean_by_hand([m.state_dict() for m in models])
    _close(got.state_dict(), mean, _params(a))

    by_hand = copy.deepcopy(base)
    by_hand.load_state_dict({k: v.float() for k, v in mean.items()}, strict=False)
    seen: dict[str, list] = {}
    norms = {n: m for n, m in by_hand.named_modules() if isinstance(m, nn.BatchNorm2d)}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.setdefault(n, []).append(inp[0].detach()))
             for n, m in norms.items()]
    by_hand.eval()
    for m in norms.values():
        m.train()
    with torch.no_grad():
        for batch in batches:
            by_hand(batch.x)
    for h in hooks:
        h.remove()
    state = got.state_dict()
    for n, inputs in seen.items():
        means = [x.double().mean(dim=(0, 2, 3)) for x in inputs]
        variances = [x.double().var(dim=(0, 2, 3), unbiased=True) for x in inputs]
        torch.testing.assert_close(state[f"{n}.running_mean"].double(), sum(means) / len(means), rtol=1e-4,
                                   atol=1e-5)
        torch.testing.assert_close(state[f"{n}.running_var"].double(), sum(variances) / len(variances), rtol=1e-4,
                                   atol=1e-5)
    assert not torch.equal(state["features.1.running_var"], mean["features.1.running_var"].float())


# -- task vectors ---------------------------------------------------------------------------------------------------


def _flat(model, names) -> torch.Tensor:
    sd = model.state_dict()
    return torch.cat([sd[n].double().reshape(-1) for n in names])


def _unflat(vector, model, names) -> dict:
    sd, out, at = model.state_dict(), {}, 0
    for n in names:
        size = sd[n].numel()
        out[n] = vector[at: at + size].reshape(sd[n].shape)
        at += size
    return out


def test_task_arithmetic_is_the_base_plus_lambda_times_the_summed_task_vectors(tuned):
    base, (a, b) = tuned
    names = _params(a)
    got = get_merge_method("task_arithmetic").merge(_inputs([a, b], base=base)).state_dict()
    tau = (_flat(a, names) - _flat(base, names)) + (_flat(b, names) - _flat(base, names))
    _close(got, _unflat(_flat(base, names) + 0.3 * tau, a, names), names)  # λ = 0.3, the default
    _close(got, _mean_by_hand([a.state_dict(), b.state_dict()]), [k for k in got if "running" in k])


def test_ties_follows_its_three_steps(tuned):
    """Yadav et al. 2023, Alg. 1 with the paper's k = 20% and λ = 1, in plain loops over the flattened task
    vectors: trim each to its top-k magnitudes, elect the sign of the summed trimmed values, average the agreeing
    ones."""
    base, (a, b) = tuned
    names = _params(a)
    taus = [_flat(m, names) - _flat(base, names) for m in (a, b)]
    d = len(taus[0])
    trimmed = []
    for t in taus:
        keep = t.abs().argsort(descending=True)[: int(0.2 * d)]
        kept = torch.zeros(d, dtype=torch.float64)
        kept[keep] = t[keep]
        trimmed.append(kept.tolist())
    summed = [trimmed[0][i] + trimmed[1][i] for i in range(d)]
    gamma = [1.0 if s > 0 else -1.0 if s < 0 else 0.0 for s in summed]
    majority = 1.0 if sum(gamma) >= 0 else -1.0
    gamma = [g if g != 0 else majority for g in gamma]
    merged = []
    for i in range(d):
        agreeing = [t[i] for t in trimmed if t[i] != 0 and (t[i] > 0) == (gamma[i] > 0)]
        merged.append(sum(agreeing) / len(agreeing) if agreeing else 0.0)
    conflicts = sum(1 for i in range(d) if trimmed[0][i] * trimmed[1][i] < 0)
    assert conflicts > 10  # the test has sign conflicts to resolve
    want = _unflat(_flat(base, names) + 1.0 * torch.tensor(merged, dtype=torch.float64), a, names)
    got = get_merge_method("ties").merge(_inputs([a, b], base=base)).state_dict()
    _close(got, want, names)


def _agreeing_copy(base, a, b) -> nn.Module:
    """b's task vector with a's signs: θ_base + |τ_b| ⊙ sgn(τ_a) on every parameter (no sign conflict)."""
    out = copy.deepcopy(b)
    sd, base_sd, a_sd = out.state_dict(), base.state_dict(), a.state_dict()
    with torch.no_grad():
        for n in _params(b):
            sd[n].copy_(base_sd[n] + (sd[n] - base_sd[n]).abs() * torch.sign(a_sd[n] - base_sd[n]))
    return out


def test_ties_without_trimming_or_sign_conflict_is_task_arithmetic(tuned):
    """With k = 100% and task vectors that agree in sign, the disjoint mean is the mean: TIES(λ) = θ_base +
    (λ/N) Σ τ_k = task arithmetic with λ/N."""
    base, (a, b) = tuned
    b2 = _agreeing_copy(base, a, b)
    ties = get_merge_method("ties").merge(_inputs([a, b2], base=base), k=1.0, lam=1.0).state_dict()
    ta = get_merge_method("task_arithmetic").merge(_inputs([a, b2], base=base), lam=0.5).state_dict()
    _close(ties, ta, list(ta))
    trimmed = get_merge_method("ties").merge(_inputs([a, b2], base=base), lam=1.0).state_dict()
    assert not torch.allclose(trimmed["features.3.weight"], ta["features.3.weight"])


def test_dare_with_drop_rate_0_is_task_arithmetic(tuned):
    base, (a, b) = tuned
    dare = get_merge_method("dare").merge(_inputs([a, b], base=base), p=0.0).state_dict()
    ta = get_merge_method("task_arithmetic").merge(_inputs([a, b], base=base)).state_dict()  # both λ = 0.3
    _close(dare, ta, list(ta))


def test_dare_drops_with_rate_p_and_rescales_the_rest(tuned):
    """Yu et al. 2024, Eq. 1: each entry of τ is 0 (with probability p) or τ/(1 − p). Merging a fine-tune with
    its own base (τ_base = 0) at λ = 1 shows the fine-tune's dropped and rescaled vector alone."""
    base, (a, _) = tuned
    names = _params(a)
    p = 0.7
    got = get_merge_method("dare").merge(_inputs([a, base], base=base), p=p, lam=1.0)
    tau, delta = _flat(a, names) - _flat(base, names), _flat(got, names) - _flat(base, names)
    tol = 1e-6 * _flat(base, names).abs() + 1e-8  # float32 rounding of θ_base + τ̃
    live = tau.abs() > 100 * tol
    dropped = delta[live] == 0
    rescaled = (delta[live] - tau[live] / (1 - p)).abs() <= tol[live]
    assert bool((dropped | rescaled).all()) and live.float().mean() > 0.5
    n, frac = int(live.sum()), dropped.float().mean().item()
    assert abs(frac - p) < 5 * (p * (1 - p) / n) ** 0.5, (frac, n)


def test_dare_is_reproducible_from_its_seed(tuned):
    base, (a, b) = tuned
    dare = get_merge_method("dare")
    one, two = (dare.merge(_inputs([a, b], base=base)).state_dict() for _ in range(2))
    other = dare.merge(_inputs([a, b], base=base), seed=1).state_dict()
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not torch.equal(one["features.3.weight"], other["features.3.weight"])


def test_breadcrumbs_masks_both_tails_per_layer(tuned):
    """Davari & Belilovsky 2024: per layer, the task vector's entries ranked by magnitude; the bottom β = 85% and
    the top 1 − γ = 0.7% masked (by hand with Python's sort), the rest summed and scaled by λ = 0.3."""
    base, (a, b) = tuned
    names = _params(a)
    base_sd, want = base.state_dict(), {}
    for n in names:
        total = torch.zeros(base_sd[n].numel(), dtype=torch.float64)
        for m in (a, b):
            tau = (m.state_dict()[n].double() - base_sd[n].double()).reshape(-1).tolist()
            ranked = sorted(range(len(tau)), key=lambda i: abs(tau[i]))
            size = len(tau)
            for i in ranked[int(0.85 * size): size - int((1 - 0.993) * size)]:
                total[i] += tau[i]
        want[n] = base_sd[n].double() + 0.3 * total.reshape(base_sd[n].shape)
    assert int((1 - 0.993) * a.state_dict()["features.3.weight"].numel()) > 0  # the top tail is masked somewhere
    got = get_merge_method("breadcrumbs").merge(_inputs([a, b], base=base)).state_dict()
    _close(got, want, names)


def test_task_vector_methods_need_the_base(tuned):
    base, (a, b) = tuned
    for name in ("task_arithmetic", "ties", "dare", "breadcrumbs"):
        with pytest.raises(MergescopeError, match=rf"^{name} needs the shared base model .*AlignInputs.base is not "
                                                  r"given$"):
            get_merge_method(name).merge(_inputs([a, b]))
    with pytest.raises(MergescopeError, match=r"^TIES's k must be in \(0, 1\], got 0.0$"):
        get_merge_method("ties").merge(_inputs([a, b], base=base), k=0.0)
    with pytest.raises(MergescopeError, match=r"^DARE's drop rate p must be in \[0, 1\), got 1.0$"):
        get_merge_method("dare").merge(_inputs([a, b], base=base), p=1.0)


# -- Fisher-weighted averaging --------------------------------------------------------------------------------------


def _fisher_by_hand(model, x) -> dict:
    """Matena & Raffel 2022, Eq. 3: (1/N) Σ_n Σ_y p(y|x_n) (∂ log p(y|x_n) / ∂θ)², one backward pass per image and
    class."""
    model = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    out = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    for i in range(len(x)):
        log_p = torch.log_softmax(model(x[i: i + 1]), dim=1)[0]
        for y in range(len(log_p)):
            grads = torch.autograd.grad(log_p[y], list(params.values()), retain_graph=True)
            for n, g in zip(params, grads):
                out[n] += log_p[y].exp().item() * g.double() ** 2
    return {n: f / len(x) for n, f in out.items()}


def test_fisher_averaging_follows_the_paper(tuned, batches):
    """The diagonal Fisher of each model on its first 12 images, by hand, and θ* = Σ λ_k F_k θ_k / Σ λ_k F_k
    (F floored at 1e-6, λ = the merge weights 0.3, 0.7)."""
    base, (a, b) = tuned
    x = batches[0].x[:12]
    fishers = [_fisher_by_hand(m, x) for m in (a, b)]
    lib = fisher.diagonal_fisher(a, batches, examples=12, chunk=5)
    for n in fishers[0]:
        torch.testing.assert_close(lib[n], fishers[0][n], rtol=1e-4, atol=1e-9, msg=n)
    got = get_merge_method("fisher").merge(_inputs([a, b], data=lambda: batches, weights=[0.3, 0.7]),
                                           examples=12).state_dict()
    want = {}
    for n in fishers[0]:
        fa, fb = fishers[0][n].clamp_min(1e-6), fishers[1][n].clamp_min(1e-6)
        ta, tb = a.state_dict()[n].double(), b.state_dict()[n].double()
        want[n] = (0.3 * fa * ta + 0.7 * fb * tb) / (0.3 * fa + 0.7 * fb)
    _close(got, want, list(want), atol=1e-5)


def test_fisher_averaging_with_equal_fishers_is_the_simple_average(tuned):
    base, (a, b) = tuned
    states = [a.state_dict(), b.state_dict()]
    g = torch.Generator().manual_seed(0)
    equal = {n: torch.rand(states[0][n].shape, generator=g, dtype=torch.float64) for n in _params(a)}
    got = fisher.fisher_average(states, [equal, equal], [0.5, 0.5])
    _close(got, _mean_by_hand(states), list(got))


# -- RegMean --------------------------------------------------------------------------------------------------------


def _linear(w) -> nn.Linear:
    layer = nn.Linear(len(w), 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([w]))
    return layer


def test_regmean_of_two_linear_models_is_the_closed_form_solved_by_hand():
    """W*ᵀ = (G̃_1 + G̃_2)⁻¹ (G̃_1 W_1ᵀ + G̃_2 W_2ᵀ) for y = W x, x ∈ R², with each model's own inputs:
    X_1 = [[1,0],[0,1],[1,1]] → G_1 = X_1ᵀX_1/3 = [[2,1],[1,2]]/3; X_2 = [[1,0],[1,0]] → G_2 = [[1,0],[0,0]];
    α = 0.9 scales the off-diagonals: G̃_1 = [[2/3, .3], [.3, 2/3]], G̃_2 = G_2. With W_1 = [1, 2], W_2 = [3, −1]:
    S = [[5/3, .3], [.3, 2/3]], det S = 919/900, b = G̃_1 W_1ᵀ + G̃_2 W_2ᵀ = [64/15, 49/30], and by Cramer's rule
    W* = [(2/3·64/15 − .3·49/30), (5/3·49/30 − .3·64/15)] / det S = [2119/919, 1298/919]."""
    xs = [torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])]
    data = [lambda x=x: [types.SimpleNamespace(x=x)] for x in xs]
    models = [_linear([1.0, 2.0]), _linear([3.0, -1.0])]
    got = get_merge_method("regmean").merge(AlignInputs(models, None, data=data))
    torch.testing.assert_close(got.weight.detach().double(), torch.tensor([[2119 / 919, 1298 / 919]],
                                                                          dtype=torch.float64))
    plain = get_merge_method("regmean").merge(AlignInputs(models, None, data=data), alpha=1.0)  # the plain least
    # squares: S = [[5/3, 1/3], [1/3, 2/3]], b = [13/3, 5/3], det S = 1, W* = [(26/9 − 5/9), (25/9 − 13/9)]
    torch.testing.assert_close(plain.weight.detach().double(), torch.tensor([[21 / 9, 12 / 9]], dtype=torch.float64))


def test_regmean_of_one_model_is_that_model(tuned, batches):
    _, (a, _) = tuned
    grams = regmean.input_grams(a, batches)
    state = a.state_dict()
    got = regmean.regmean_state([state], [grams], 0.9, [1.0])
    assert set(got) == {"features.0.weight", "features.3.weight", "features.7.weight", "classifier.weight"}
    _close(got, state, list(got), atol=1e-5)


def test_regmean_grams_of_a_conv_are_those_of_its_input_patches():
    """A convolution is a linear layer on its (zero-padded) input patches: G = mean over images and output
    positions of patch·patchᵀ, patches cut out by hand."""
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
    x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    rows = [padded[n, :, i: i + 3, j: j + 3].reshape(-1) for n in range(4) for i in range(0, 5, 2)
            for j in range(0, 5, 2)]
    want = sum(torch.outer(r, r).double() for r in rows) / len(rows)
    got = regmean.input_grams(nn.Sequential(conv), [types.SimpleNamespace(x=x)])["0"]
    torch.testing.assert_close(got, want)


# -- soups ----------------------------------------------------------------------------------------------------------


def test_a_greedy_soup_never_scores_below_its_best_ingredient(tuned):
    """Wortsman et al. 2022, Recipe 1 by hand: ingredients by decreasing held-out accuracy, each kept iff the
    soup's accuracy does not drop; ingredients: the fine-tunes, the base and a noisy base (a bad one, first)."""
    base, (a, b) = tuned
    noisy = copy.deepcopy(base)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.5 * p.abs().mean() * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    ingredients = [noisy, a, b, base]
    score = soups.heldout_accuracy(load_digits("test"))
    got = get_merge_method("greedy_soup").merge(_inputs(ingredients, heldout=score))
    accs = [score(m) for m in ingredients]
    assert score(got) >= max(accs) and accs[0] < max(accs) - 0.05

    order = sorted(range(4), key=lambda k: -accs[k])
    soup, best = [order[0]], accs[order[0]]
    for k in order[1:]:
        trial = copy.deepcopy(base)
        trial.load_state_dict({n: v.float() if v.is_floating_point() else v for n, v in
                               {**ingredients[0].state_dict(),
                                **_mean_by_hand([ingredients[i].state_dict() for i in soup + [k]])}.items()})
        if score(trial) >= best:
            soup, best = soup + [k], score(trial)
    state, kept = soups.greedy_soup([m.state_dict() for m in ingredients],
                                    lambda st: score(_loaded(base, st)))
    assert kept == soup and score(got) == best
    _close(got.state_dict(), _mean_by_hand([ingredients[i].state_dict() for i in soup]), _params(a))


def _loaded(template, state):
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model


# -- ensembles ------------------------------------------------------------------------------------------------------


def test_ensembles_average_logits_or_probabilities_at_n_times_the_cost(tuned, batches):
    base, (a, b) = tuned
    x = batches[0].x
    models = [a, b, base]
    logits = get_merge_method("logit_ensemble").merge(_inputs(models, weights=[0.5, 0.3, 0.2]))
    probs = get_merge_method("prob_ensemble").merge(_inputs(models, weights=[0.5, 0.3, 0.2]))
    with torch.no_grad():
        zs = [m(x) for m in models]
        torch.testing.assert_close(logits(x), 0.5 * zs[0] + 0.3 * zs[1] + 0.2 * zs[2])
        p = 0.5 * zs[0].softmax(1) + 0.3 * zs[1].softmax(1) + 0.2 * zs[2].softmax(1)
        torch.testing.assert_close(probs(x), p.log())
    one = sum(q.numel() for q in a.parameters())
    assert ensemble.inference_cost(logits) == {"parameters": 3 * one, "forward_passes": 3}
    assert ensemble.inference_cost(a) == {"parameters": one, "forward_passes": 1}
    assert all(m is not a for m in logits.members)  # copies: a fix applied to the ensemble leaves the inputs alone


# -- composition ----------------------------------------------------------------------------------------------------


def test_weight_matching_then_ties_undoes_a_permutation(tuned):
    """``permuted>ties`` on (a, a permuted copy of b), matched by weight matching, is TIES on (a, b): the
    fine-tunes of one base are matched back exactly, and TIES then runs in the reference's space."""
    base, (a, b) = tuned
    spec = build_spec(a)
    shuffled = permute_model(b, spec, random_perms(spec, torch.Generator().manual_seed(5)))
    match = weight_matching(a.state_dict(), shuffled.state_dict(), spec)
    composed = get_merge_method("permuted>ties").merge(AlignInputs([a, shuffled], spec, matches=[match], base=base))
    plain = get_merge_method("ties").merge(AlignInputs([a, b], spec, base=base))
    _close(composed.state_dict(), plain.state_dict(), _params(a))
    unaligned = get_merge_method("ties").merge(AlignInputs([a, shuffled], spec, base=base))
    assert not torch.allclose(unaligned.state_dict()["features.3.weight"], plain.state_dict()["features.3.weight"])
