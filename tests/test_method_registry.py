"""The merge-method registry: every registered method is checked here for free (timm's tests/test_models.py style).

For each method: its metadata is well-formed; its alignment (or combine) step takes exactly its declared
hyperparameters and reads only the inputs it declares; its ``exact_for_permuted`` flag is true — merging a trained
model with a randomly permuted copy of itself gives the model's outputs back when the flag says so, and does not
when it says not; merging a model with copies of itself (at its ``identity_params``) gives the model back; a
sweepable method leaves the reference's channels as they are; ``max_models`` is enforced. An ensemble's outputs
are compared as log-probabilities (a probability ensemble returns log p). Compositions ``alignment>aggregation``
are checked at the end.
"""
from __future__ import annotations

import copy
import inspect
import subprocess
import sys

import pytest
import torch

from mergescope import merge
from mergescope.align import match_many
from mergescope.align.covariance import PLACES, group_covariances_at
from mergescope.data import iter_batches, load_digits, subset_per_class
from mergescope.errors import MergescopeError
from mergescope.merge import recipes
from mergescope.merge.aggregate import recompute_batchnorm
from mergescope.merge.methods import (BATCHNORM, FAMILIES, NEEDS, AlignInputs, StatsMaps, get_fix, get_merge_method,
                                      list_fixes, list_merge_methods, methods_help, methods_table,
                                      register_merge_method)
from mergescope.perm import build_spec, permute_model, random_perms

METHODS = list_merge_methods()


def _rel_err(model, ref, x, log_probs: bool = False) -> float:
    with torch.no_grad():
        y, want = model.eval()(x), ref.eval()(x)
    if log_probs:
        y, want = torch.log_softmax(y, 1), torch.log_softmax(want, 1)
    return ((y - want).abs().max() / want.abs().max()).item()


class Case:
    """Models of one architecture with everything any method may need gathered once (sweep.py's way: activation
    matching of every model to the first, joint statistics at every place in one pass); :meth:`inputs` hands a
    method only what it declares: also a base (``base``), the first statistics batch as data, the accuracy on
    the statistics batches as held-out score and equal sample counts."""

    def __init__(self, models, batches, base=None):
        self.models, self.batches, self.base = list(models), batches, base
        self.x = torch.cat([b.x for b in batches])
        self.y = torch.cat([b.y for b in batches])
        self.spec = build_spec(self.models[0], self.x[:8])
        self.layout = merge.map_layout(self.models[0], self.spec)
        ref, others = self.models[0], self.models[1:]
        self.matches = match_many(ref, others, self.spec, batches)
        self.stats = group_covariances_at(ref, others, self.spec, batches, PLACES)

    def inputs(self, method, n: int | None = None) -> AlignInputs:
        n = n or len(self.models)
        needs = method.needs
        return AlignInputs(self.models[:n], self.spec,
                           matches=self.matches[:n - 1] if "matches" in needs else None,
                           stats={p: self.stats[p][:n - 1] for p in method.places()} or None,
                           base=self.base if "base" in needs else None,
                           data=(lambda: self.batches[:1]) if "data" in needs else None,
                           heldout=self.heldout if "heldout" in needs else None,
                           sample_counts=[len(self.x)] * n if "sample_counts" in needs else None)

    def heldout(self, model) -> float:
        with torch.no_grad():
            return (model.eval()(self.x).argmax(1) == self.y).float().mean().item()

    def merged(self, method, n: int, **params):
        inputs = self.inputs(method, n)
        inputs.weights = [1.0 / n] * n
        return method.merge(inputs, layout=self.layout, **params)


@pytest.fixture(scope="module")
def batches():
    """200 training digits (20 per class), two batches: statistics and outputs on the same images."""
    train = load_digits("train")
    return list(iter_batches(train, 100, ids=subset_per_class(train.targets, 20)))


@pytest.fixture(scope="module")
def copies(trained_digits, batches):
    """A trained digits CNN and two randomly permuted copies of it (base: another trained model)."""
    a = trained_digits("cnn_digits", 0, width=16)
    spec = build_spec(a)
    perms = [random_perms(spec, torch.Generator().manual_seed(s)) for s in (1, 2)]
    return Case([a, *(permute_model(a, spec, p) for p in perms)], batches, trained_digits("cnn_digits", 1, width=16))


@pytest.fixture(scope="module")
def same(trained_digits, batches):
    """A trained digits CNN and two exact (unpermuted) copies of it (base: another trained model)."""
    a = trained_digits("cnn_digits", 0, width=16)
    return Case([a, copy.deepcopy(a), copy.deepcopy(a)], batches, trained_digits("cnn_digits", 1, width=16))


@pytest.fixture(scope="module")
def pair(trained_digits, batches):
    """The trained, non-permuted pair (seeds 0 and 1)."""
    return Case([trained_digits("cnn_digits", s, width=16) for s in (0, 1)], batches)


@pytest.mark.parametrize("name", METHODS)
def test_metadata_is_well_formed(name):
    m = get_merge_method(name)
    assert m.name == name and m.family in FAMILIES and m.paper.strip() and m.about.strip()
    assert m.needs <= set(NEEDS) and m.batchnorm in BATCHNORM
    assert m.family not in ("ensemble",) or m.combine is not None  # an ensemble is a module, not a weighted sum
    if m.identity_params is not None:
        assert set(m.identity_params(3)) <= {h.name for h in m.hyperparams}
    assert m.max_models is None or m.max_models >= 2
    for h in m.hyperparams:
        assert h.type in (bool, int, float, str) and h.help.strip()
        assert type(h.default) is h.type and h.check(h.default, name) == h.default
        assert not h.choices or h.default in h.choices
    assert len({h.name for h in m.hyperparams}) == len(m.hyperparams)


@pytest.mark.parametrize("name", METHODS)
def test_align_takes_exactly_the_declared_hyperparameters(name):
    """The registry's defaults are the only ones: the alignment (or combine) code declares each hyperparameter,
    none defaulted, after its inputs (and the combine step's weights)."""
    m = get_merge_method(name)
    fn = m.combine or (m.align.fit if isinstance(m.align, StatsMaps) else m.align)
    params = list(inspect.signature(fn).parameters.values())[1 if m.combine is None else 2:]
    assert [p.name for p in params] == [h.name for h in m.hyperparams]
    assert all(p.default is inspect.Parameter.empty for p in params)


@pytest.mark.parametrize("name", METHODS)
def test_exact_for_permuted_flag_is_true(name, copies):
    """Merging a trained model with a randomly permuted copy returns its function iff the flag says so."""
    m = get_merge_method(name)
    net = copies.merged(m, 2)
    err = _rel_err(net, copies.models[0], copies.x, m.family == "ensemble")
    if m.exact_for_permuted:
        assert err < 1e-4, f"{name} is flagged exact for permuted copies but is off by {err:.2e}"
    else:
        assert err > 1e-2, f"{name} is flagged not exact for permuted copies but is exact ({err:.2e})"


@pytest.mark.parametrize("name", [n for n in METHODS if get_merge_method(n).max_models is None
                                  and get_merge_method(n).exact_for_permuted])
def test_three_permuted_copies_merge_into_the_model(name, copies):
    m = get_merge_method(name)
    net = copies.merged(m, 3)
    assert _rel_err(net, copies.models[0], copies.x, m.family == "ensemble") < 1e-4


@pytest.mark.parametrize("name", METHODS)
def test_merging_a_model_with_itself_returns_it(name, same):
    """Three (or at most max_models) exact copies of a trained model merge into its function, at the method's
    identity hyperparameters (λ = 1/n for the sums of task vectors, no trimming or dropping); a method that
    recomputes BatchNorm statistics gives the model with its statistics recomputed on the same data."""
    m = get_merge_method(name)
    n = min(3, m.max_models or 3)
    params = m.identity_params(n) if m.identity_params else {}
    net = same.merged(m, n, **params)
    want = same.models[0]
    if m.batchnorm == "reset":
        want = recompute_batchnorm(copy.deepcopy(want), same.batches[:1])
    assert _rel_err(net, want, same.x, m.family == "ensemble") < 1e-4
    assert all(torch.equal(p, q) for p, q in zip(same.models[0].state_dict().values(),
                                                 same.models[1].state_dict().values()))  # inputs untouched


@pytest.mark.parametrize("name", list_merge_methods(sweepable=True))
def test_sweepable_methods_leave_the_reference_as_it_is(name, pair):
    """A sweepable method maps the reference by the identity, so θ(α) = α·A + (1−α)·T(B) has A at α = 1."""
    m = get_merge_method(name)
    maps = m(pair.inputs(m))
    for g, cmap in maps[0].items():
        assert torch.equal(cmap.forward, torch.eye(len(cmap.forward), dtype=cmap.forward.dtype)), g


@pytest.mark.parametrize("name", [n for n in METHODS if get_merge_method(n).max_models is not None])
def test_max_models_is_enforced(name, copies):
    m = get_merge_method(name)
    n = m.max_models + 1
    models = (copies.models * n)[:n]
    with pytest.raises(MergescopeError, match=rf"^{name} merges at most {m.max_models} models, got {n}$"):
        m(AlignInputs(models, copies.spec))


@pytest.mark.parametrize("name", recipes.MAP_METHODS)
def test_defaults_are_the_library_functions_defaults(name, pair):
    """At its defaults a map method gives the maps of the library's function at the defaults its module docstring
    names the reference's (and recipes.MAP_METHODS, which sweep and many read, the same), on a trained pair."""
    direct = {
        "cca": lambda st: merge.cca_maps(st)[0],
        "cca_relative": lambda st: merge.cca_maps(st, relative=True)[0],
        "ot": lambda st: merge.ot_maps(st)[0],
        "ot_sinkhorn": lambda st: merge.ot_maps(st, reg=0.01, cost="correlation")[0],
        "regression": lambda st: merge.regression_maps(st)[0],
        "regression_ols": lambda st: merge.regression_maps(st, ridge=0.0)[0],
    }[name]
    m = get_merge_method(name)
    [place] = m.places()
    want = direct(pair.stats[place][0])
    got = m(pair.inputs(m))[1]
    legacy = recipes.MAP_METHODS[name]({p: pair.stats[p][0] for p in PLACES})
    assert got.keys() == want.keys() == legacy.keys()
    for g in want:
        assert torch.equal(got[g].forward, want[g].forward) and torch.equal(got[g].inverse, want[g].inverse), g
        assert torch.equal(legacy[g].forward, want[g].forward), g


def test_zipit_weighs_the_models_by_the_merge_weights(pair):
    """ZipIt!'s merged mean weighs A's features by α: with merge weights (0.3, 0.7) the registry's maps give
    zipit_merge(alpha=0.3) exactly (on a trained pair, where the weighting matters)."""
    m = get_merge_method("zipit")
    inputs = pair.inputs(m)
    inputs.weights = [0.3, 0.7]
    got = merge.merge_models_with_maps(pair.models, inputs.weights, m(inputs), pair.layout).state_dict()
    want = merge.zipit_merge(*pair.models, None, pair.spec, alpha=0.3, layout=pair.layout,
                             stats=pair.stats["observe"][0]).model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def _same_maps(x, y) -> bool:
    """Two methods' outputs (per model, group -> ChannelMap) are the same bit for bit."""
    def same(s, t):
        return (s is None and t is None) or (s is not None and t is not None and torch.equal(s, t))

    return len(x) == len(y) and all(
        mx.keys() == my.keys() and all(same(mx[g].forward, my[g].forward) and same(mx[g].inverse, my[g].inverse)
                                       for g in mx)
        for mx, my in zip(x, y))


@pytest.mark.parametrize("name", METHODS)
def test_uses_weights_flag_is_true(name, pair):
    """A method's maps depend on the merge weights iff its ``uses_weights`` says so (the merge plan computes the
    maps once per method unless the flag is set): on a trained pair, weights (0.3, 0.7) and (0.5, 0.5)."""
    m = get_merge_method(name)
    maps = []
    for weights in ([0.3, 0.7], [0.5, 0.5]):
        inputs = pair.inputs(m)
        inputs.weights = weights
        maps.append(m(inputs))
    if m.uses_weights:
        assert not _same_maps(*maps), f"{name} is flagged uses_weights but its maps ignore the weights"
    else:
        assert _same_maps(*maps), f"{name} is not flagged uses_weights but its maps depend on the weights"


def test_hyperparameters_are_checked_and_used(pair):
    cca = get_merge_method("cca")
    inputs = pair.inputs(cca)
    with pytest.raises(MergescopeError, match=r"^cca has no hyperparameter 'gamma'; it has: ridge$"):
        cca(inputs, gamma=1.0)
    with pytest.raises(MergescopeError, match=r"^cca: hyperparameter 'ridge' must be a float, got 'big'$"):
        cca(inputs, ridge="big")
    with pytest.raises(MergescopeError, match=r"must be one of regression, pinv, got 'inv'$"):
        get_merge_method("regression")(pair.inputs(get_merge_method("regression")), inverse="inv")
    g = next(iter(pair.spec.groups))
    assert not torch.equal(cca(inputs, ridge=10)[1][g].forward, cca(inputs)[1][g].forward)


def test_missing_inputs_are_named(copies):
    with pytest.raises(ValueError, match="permuted needs the matches of the 1 other models"):
        get_merge_method("permuted")(AlignInputs(copies.models[:2], copies.spec))
    with pytest.raises(ValueError, match="ot needs the joint statistics at 'preactivation'"):
        get_merge_method("ot")(AlignInputs(copies.models[:2], copies.spec, stats={"observe": copies.stats["observe"]}))


def test_lookups_and_registration_errors():
    with pytest.raises(MergescopeError, match=r"^unknown merge method 'cc'; known: naive, permuted, .*zipit, "
                                              r"average, .*prob_ensemble$"):
        get_merge_method("cc")
    with pytest.raises(MergescopeError, match="^unknown merge method family 'maps'; known: ensemble, "):
        list_merge_methods("maps")
    with pytest.raises(ValueError, match="'naive' is already registered"):
        register_merge_method("naive", family="aggregation", paper="p", about="a", exact_for_permuted=False)(
            lambda inputs: [])
    with pytest.raises(ValueError, match="family must be one of"):
        register_merge_method("new", family="soup", paper="p", about="a", exact_for_permuted=False)(lambda i: [])
    with pytest.raises(ValueError, match="needs must be a subset of"):
        register_merge_method("new", family="map", paper="p", about="a", needs={"stats"},
                              exact_for_permuted=False)(lambda i: [])
    assert "new" not in list_merge_methods() and get_merge_method("naive").family == "aggregation"
    assert list_merge_methods("map") == ["cca", "cca_relative", "ot", "ot_sinkhorn", "regression",
                                         "regression_ols", "zipit"]
    assert set(list_merge_methods(sweepable=False)) == {"mergemany", "zipit"} | set(recipes.COMBINED) - {"ste"}
    with pytest.raises(ValueError, match="without '\\+' or '>'"):
        register_merge_method("a>b", family="map", paper="p", about="a", exact_for_permuted=False)(lambda i: [])
    with pytest.raises(ValueError, match="batchnorm must be one of carry, reset, repair, got 'keep'"):
        register_merge_method("new", family="map", paper="p", about="a", exact_for_permuted=False,
                              batchnorm="keep")(lambda i: [])
    assert "new" not in list_merge_methods()
    with pytest.raises(MergescopeError, match="^unknown fix 'repairs'; known: repair, repair_preact, reset$"):
        get_fix("repairs")


def test_recipes_names_come_from_the_registry():
    """The merge plan's bases are the registry's methods without a combine step (it runs the weighted sum of the
    mapped models): a method that combines models itself is not silently run as a weighted sum."""
    assert recipes.BASES == tuple(n for n in METHODS if get_merge_method(n).combine is None
                                  and not get_merge_method(n).needs & {"base", "data", "heldout", "sample_counts"})
    assert recipes.COMBINED == tuple(n for n in METHODS if n not in recipes.BASES)
    assert {"ties", "regmean", "logit_ensemble", "ste"} <= set(recipes.COMBINED) and "naive" in recipes.BASES
    assert recipes.FIXES == ("", "+repair", "+repair_preact", "+reset")
    assert recipes.REPAIR_FIXES == {"repair": "reference", "repair_preact": "preact"}
    assert len(recipes.ALL_METHODS) == len(recipes.BASES) * 4 and "cca+repair" in recipes.ALL_METHODS
    assert "ties" not in recipes.ALL_METHODS and "permuted>ties" not in recipes.ALL_METHODS
    with pytest.raises(MergescopeError, match="^unknown merge method 'ties'; known: naive, "):
        recipes.check_methods(["ties"])
    assert [recipes.batchnorm_of(m) for m in ("cca", "swa", "ties+repair", "permuted>ties+reset", "logit_ensemble")] \
        == ["carry", "reset", "repair", "reset", "carry"]
    assert recipes.split_method("permuted>ties+reset") == ("permuted>ties", "reset")
    method, fix = recipes.resolve_method("permuted>ties+reset")
    assert (method.name, fix) == ("permuted>ties", "reset") and recipes.resolve_method("swa")[1] == ""
    with pytest.raises(MergescopeError, match="^unknown fix 'rset'; known: repair, repair_preact, reset$"):
        recipes.resolve_method("ties+rset")
    assert set(recipes.MAP_METHODS) == {n for n in METHODS if isinstance(get_merge_method(n).align, StatsMaps)}
    assert recipes.map_places(["naive", "permuted"]) == () and recipes.map_places(["zipit"]) == ("observe",)
    assert recipes.map_places(["ot", "cca"]) == ("observe", "preactivation")


def test_listings_name_every_method_and_fix():
    table, help_ = methods_table(), methods_help("naive permuted", exclude=("zipit",))
    every = methods_help(combining=True).split("any of the bases ")[1].split(", alone")[0].split()
    for name in METHODS:
        m = get_merge_method(name)
        assert f"{name}  [{m.family}]" in table and m.paper in table
        assert f"{name}  [{m.family}]\n" + "\n".join(table.split(f"{name}  [{m.family}]\n")[1].split("\n")[:3]) \
            in table and f"batchnorm: {m.batchnorm}: {BATCHNORM[m.batchnorm]}" in table
        assert all(f"{h.name} = {h.default!r}" in table for h in m.hyperparams)
        listed = name in help_.split("any of the bases ")[1].split(", alone")[0].split()
        assert listed == (name != "zipit" and m.plan_ready)  # the plan's bases only, by default
        assert name in every
    assert all(f"+{f}" in table and f"+{f}" in help_ for f in list_fixes())
    assert help_.startswith("default: naive permuted; ")
    assert "compositions: <alignment>><aggregation>[+fix]" in table and "N× the parameters and FLOPs" in table


def test_the_registry_imports_without_torch():
    code = "import sys, mergescope.merge.methods as m; m.methods_help(); m.methods_table(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- compositions: alignment, then aggregation -----------------------------------------------------------------------


def test_an_alignment_then_an_aggregation_is_one_method(copies):
    """``permuted>X`` permutes every model onto the reference by the given matches, then aggregates with X: on
    permuted copies of one model, averaging and TIES without trimming (a shared base) give the model back, and the
    composed method names both papers and takes the aggregation's hyperparameters."""
    avg, ties = get_merge_method("permuted>average"), get_merge_method("permuted>ties")
    assert avg.family == "aggregation" and avg.needs == {"matches"} and avg.exact_for_permuted
    assert ties.needs == {"matches", "base"} and not ties.exact_for_permuted and ties.batchnorm == "carry"
    assert get_merge_method("permuted").paper in ties.paper and get_merge_method("ties").paper in ties.paper
    assert [h.name for h in ties.hyperparams] == ["k", "lam"] and get_merge_method("permuted>ties") is ties
    assert _rel_err(copies.merged(avg, 3), copies.models[0], copies.x) < 1e-4
    assert _rel_err(copies.merged(ties, 3, k=1.0), copies.models[0], copies.x) < 1e-4
    assert _rel_err(copies.merged(get_merge_method("ties"), 3, k=1.0), copies.models[0], copies.x) > 1e-2
    maps = ties(copies.inputs(ties))  # the alignment's maps: the reference stays, the others are permuted
    assert maps[0] == {} and all(maps[1].values())


@pytest.mark.parametrize("string, message", [
    ("cca>ties", r"^'cca>ties': the part before '>' must be an alignment method \(permuted, mergemany, ste\), got "
                 r"'cca'$"),
    ("permuted>logit_ensemble", r"^'permuted>logit_ensemble': the part after '>' must be an aggregation method "
                                r"\(naive, average, .*\), got 'logit_ensemble'$"),
    ("mergemany>ties", r"^'mergemany>ties': ties reads the shared base in the reference's space, and mergemany moves "
                       r"the reference; use one of permuted, ste$"),
    ("permuted>tie", r"^unknown merge method 'tie'; known: "),
    ("permuted>permuted>ties", r"^'permuted>permuted>ties': one alignment, then one aggregation \(a single '>'\)$"),
])
def test_bad_compositions_are_one_line_errors(string, message):
    with pytest.raises(MergescopeError, match=message):
        get_merge_method(string)


def test_missing_combine_inputs_are_named(copies):
    models = copies.models[:2]
    cases = [("ties", {}, "ties needs the shared base model the models were fine-tuned from (task vectors are "
                          "θ_k − θ_base): AlignInputs.base is not given"),
             ("regmean", {}, "regmean needs batches of data (a factory, or one per model): AlignInputs.data is not "
                             "given"),
             ("greedy_soup", {}, "greedy_soup needs a held-out score of a model"),
             ("fedavg", {"sample_counts": [1, 2, 3]}, "fedavg: AlignInputs.sample_counts needs one entry per model "
                                                      "(2), got 3"),
             ("fedavg", {"sample_counts": [0, 2]}, "sample counts must be positive integers, got [0, 2]"),
             ("regmean", {"data": copies.batches}, "regmean: AlignInputs.data must make the batches (e.g. lambda: "
                                                   "iter_batches(dataset, 500)), or be one such function per model")]
    for name, extra, message in cases:
        with pytest.raises(MergescopeError, match="^" + message.replace("(", "\\(").replace(")", "\\)")
                           .replace("[", "\\[").replace("]", "\\]")):
            get_merge_method(name).merge(AlignInputs(models, copies.spec, **extra))
