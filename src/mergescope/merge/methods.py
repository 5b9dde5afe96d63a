"""The merge-method registry: every way of putting models into one channel space, registered once with its paper.

A *merge method* (a base) says how each model is mapped into the merged channel space; the merge itself is always
the weighted sum of the mapped models (:func:`mergescope.merge.maps.merge_models_with_maps`). A method is a
:class:`MergeMethod`: its family (:data:`FAMILIES`), the paper and equation it implements, the inputs its alignment
step needs (:data:`NEEDS`), typed hyperparameters with the reference's defaults, and whether merging a model with a
permuted copy of itself gives that model's function back (asserted for every method by
``tests/test_method_registry.py``). A *fix* (:class:`Fix`: REPAIR, RESET) is applied after the merge.

Registering, in the spirit of timm's model registry::

    @register_merge_method("mine", family="map", paper="...", about="...", needs={"stats:observe"},
                           exact_for_permuted=True, hyperparams=(HyperParam("ridge", float, 0.1, "..."),))
    def _mine(inputs: AlignInputs, ridge: float) -> list[Maps]:
        ...

    get_merge_method("cca")(inputs)                  # per model (reference first) its maps; defaults filled in
    get_merge_method("cca")(inputs, ridge=1.0)

This module imports no torch at import time (the command line builds its help from it); each method's code is
imported when it runs.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import MergescopeError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..align import MatchResult
    from ..align.covariance import JointMoments
    from ..perm import PermSpec
    from .maps import ChannelMap

    Maps = dict[str, ChannelMap]  # group -> map of one model's channels into the merged space ({}: identity)

FAMILIES = ("ensemble", "aggregation", "alignment", "map")
NEEDS = ("matches", "weights", "stats:observe", "stats:preactivation")  # what an alignment step may read
_PLACES = ("observe", "preactivation")  # mergescope.align.covariance.PLACES, without importing torch


@dataclass(frozen=True)
class HyperParam:
    """A typed hyperparameter of a merge method; ``default`` is the reference's value."""

    name: str
    type: type  # bool, int, float or str
    default: Any
    help: str
    choices: tuple = ()  # the allowed values, where they are a fixed set

    def check(self, value: Any, method: str) -> Any:
        """``value`` as this parameter's type (an int is a float), or a one-line error naming what is allowed."""
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (isinstance(value, bool) and self.type is not bool):
            raise MergescopeError(f"{method}: hyperparameter '{self.name}' must be a {self.type.__name__}, "
                                  f"got {value!r}")
        if self.choices and value not in self.choices:
            raise MergescopeError(f"{method}: hyperparameter '{self.name}' must be one of "
                                  f"{', '.join(map(str, self.choices))}, got {value!r}")
        return value


@dataclass
class AlignInputs:
    """What an alignment step may read; only the fields its method ``needs`` must be given."""

    models: Sequence[nn.Module]  # reference first
    spec: PermSpec
    matches: Sequence[MatchResult] | None = None  # models[1:] matched to models[0] ("matches")
    stats: Mapping[str, Sequence[Mapping[str, JointMoments]]] | None = None  # place -> per other model -> group
    device: torch.device | str = "cpu"
    weights: Sequence[float] | None = None  # the merge weights, for maps that depend on them (zipit); None: equal


@dataclass(frozen=True)
class MergeMethod:
    """One merge method (a base): how every model is mapped into the merged space, with its paper.

    Call it with :class:`AlignInputs` (and hyperparameters by name) for the per-model maps, reference first.
    """

    name: str
    family: str  # one of FAMILIES
    paper: str  # citation: authors year, title, and the equation/algorithm used
    about: str  # what this variant does and how it differs from the paper's default, if it does
    needs: frozenset[str]  # inputs of its alignment step, from NEEDS
    exact_for_permuted: bool  # merging a model with a permuted copy of itself returns that model's function
    max_models: int | None  # at most this many models (None: any number)
    sweepable: bool  # the reference's maps are the identity: it can be swept along α with the reference moving
    hyperparams: tuple[HyperParam, ...]
    align: Callable[..., list[Maps]]  # (AlignInputs, **hyperparams) -> per model its maps into the merged space
    uses_weights: bool = False  # its maps depend on the merge weights (AlignInputs.weights), as ZipIt!'s do

    def defaults(self) -> dict[str, Any]:
        return {h.name: h.default for h in self.hyperparams}

    def resolve(self, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The defaults updated by ``params``; an unknown name or a wrong type is a one-line error."""
        known = {h.name: h for h in self.hyperparams}
        for key in params or {}:
            if key not in known:
                raise MergescopeError(f"{self.name} has no hyperparameter '{key}'; it has: "
                                      f"{', '.join(known) or 'none'}")
        return {**self.defaults(), **{k: known[k].check(v, self.name) for k, v in (params or {}).items()}}

    def places(self) -> tuple[str, ...]:
        """Where its joint statistics are gathered (:data:`mergescope.align.covariance.PLACES`)."""
        return tuple(p for p in _PLACES if f"stats:{p}" in self.needs)

    def check_models(self, n: int) -> None:
        if n < 2:
            raise MergescopeError(f"merging needs at least two models, got {n}")
        if self.max_models is not None and n > self.max_models:
            raise MergescopeError(f"{self.name} merges at most {self.max_models} models, got {n}")

    def __call__(self, inputs: AlignInputs, **params: Any) -> list[Maps]:
        """Per model (reference first), its maps into the merged space."""
        n = len(inputs.models)
        self.check_models(n)
        hp = self.resolve(params)
        if "matches" in self.needs and (inputs.matches is None or len(inputs.matches) != n - 1):
            raise ValueError(f"{self.name} needs the matches of the {n - 1} other models to the reference")
        for place in self.places():
            if inputs.stats is None or len(inputs.stats.get(place, ())) != n - 1:
                raise ValueError(f"{self.name} needs the joint statistics at '{place}' of the {n - 1} other models")
        return self.align(inputs, **hp)


@dataclass(frozen=True)
class StatsMaps:
    """The alignment step of a method that maps each other model into the reference's space from that model's own
    joint statistics with the reference at one place (the reference keeps its channels: identity maps)."""

    place: str  # "observe" or "preactivation"
    fit: Callable[..., Maps]  # ({group: JointMoments}, **hyperparams) -> the model's maps into the reference's space

    def __call__(self, inputs: AlignInputs, **hp: Any) -> list[Maps]:
        return [{}] + [self.fit(stats, **hp) for stats in inputs.stats[self.place]]


_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(name: str, *, family: str, paper: str, about: str, needs: Iterable[str] = (),
                          exact_for_permuted: bool, max_models: int | None = None, sweepable: bool = True,
                          hyperparams: Sequence[HyperParam] = (), uses_weights: bool = False) -> Callable:
    """Decorator: register the alignment step below it (``(AlignInputs, **hyperparams) -> list[Maps]``, or a
    :class:`StatsMaps`) as merge method ``name``; returns it unchanged. A name registered twice is an error."""

    def register(align: Callable[..., list[Maps]]) -> Callable[..., list[Maps]]:
        method = MergeMethod(name, family, paper, about, frozenset(needs), exact_for_permuted, max_models,
                             sweepable, tuple(hyperparams), align, uses_weights)
        if name in _METHODS:
            raise ValueError(f"merge method '{name}' is already registered")
        if "+" in name or not name:
            raise ValueError(f"a merge method's name must be non-empty and without '+', got '{name}'")
        if family not in FAMILIES:
            raise ValueError(f"{name}: family must be one of {', '.join(FAMILIES)}, got '{family}'")
        if not method.needs <= set(NEEDS):
            raise ValueError(f"{name}: needs must be a subset of {', '.join(NEEDS)}, got {sorted(method.needs)}")
        _METHODS[name] = method
        return align

    return register


def get_merge_method(name: str) -> MergeMethod:
    """The registered method ``name``; an unknown name is a one-line error listing the known ones."""
    if name not in _METHODS:
        raise MergescopeError(f"unknown merge method '{name}'; known: {', '.join(_METHODS)}")
    return _METHODS[name]


def list_merge_methods(family: str | None = None, sweepable: bool | None = None) -> list[str]:
    """The registered methods' names in registration order, optionally of one family / only (non-)sweepable ones."""
    if family is not None and family not in FAMILIES:
        raise MergescopeError(f"unknown merge method family '{family}'; known: {', '.join(FAMILIES)}")
    return [n for n, m in _METHODS.items()
            if (family is None or m.family == family) and (sweepable is None or m.sweepable == sweepable)]


def stats_places(names: Iterable[str]) -> tuple[str, ...]:
    """The places whose joint statistics these methods need, in :data:`PLACES` order (one pass gathers all)."""
    wanted = {p for n in names for p in get_merge_method(n).places()}
    return tuple(p for p in _PLACES if p in wanted)


# -- fixes ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fix:
    """A correction applied to a merged model (``method+fix``)."""

    name: str
    paper: str
    corrects: str  # what it corrects, in one line
    repair_points: str | None  # REPAIR's RepairTarget.points ("reference", "preact"); None: not a REPAIR
    needs_batchnorm: bool  # means nothing for a model without BatchNorm (skipped there)

    def describe(self, spec: PermSpec) -> str:
        """Which points of this architecture it corrects (for reports)."""
        if self.repair_points is None:
            return "every BatchNorm's statistics recomputed"
        from .repair import describe_repair

        return describe_repair(spec, self.repair_points)


_JORDAN = ("Jordan et al. 2023, 'REPAIR: REnormalizing Permuted Activations for Interpolation Repair' "
           "(ICLR 2023)")
_FIXES: dict[str, Fix] = {f.name: f for f in (
    Fix("repair", _JORDAN + ", REPAIR", "each corrected channel's mean and std become the weighted mean of the "
        "mapped endpoints' (pre-activations; on a residual net every block output through an added per-channel "
        "affine, and every BatchNorm reset, as the reference's Merge-ResNet code)", "reference", False),
    Fix("repair_preact", _JORDAN + ", REPAIR", "REPAIR of the pre-activation outputs only, fused into the weights "
        "(the original architecture; the same as repair on a net without residual streams)", "preact", False),
    Fix("reset", _JORDAN + ", RESET", "every BatchNorm's running statistics recomputed on the data", None, True),
)}


def get_fix(name: str) -> Fix:
    """The fix ``name`` (``"repair"``, ``"repair_preact"``, ``"reset"``); unknown: a one-line error."""
    if name not in _FIXES:
        raise MergescopeError(f"unknown fix '{name}'; known: {', '.join(_FIXES)}")
    return _FIXES[name]


def list_fixes() -> list[str]:
    return list(_FIXES)


# -- listings -------------------------------------------------------------------------------------------------------


def methods_help(default: str | None = None, exclude: Iterable[str] = ()) -> str:
    """The command line's ``--methods`` help: every base not in ``exclude`` (with its model limit), the fixes."""
    exclude = set(exclude)
    bases = " ".join(n + (f" (at most {m.max_models} models)" if m.max_models else "")
                     for n, m in _METHODS.items() if n not in exclude)
    head = f"default: {default}; " if default else ""
    return (f"{head}any of the bases {bases}, alone or with {', '.join('+' + f for f in _FIXES)} "
            "(e.g. cca+repair)")


def methods_table() -> str:
    """A plain-text listing of every method and fix: family, exact for permuted copies, needs, paper,
    hyperparameters with defaults (``mergescope methods``)."""
    lines = []
    for m in _METHODS.values():
        limits = ", ".join(x for x in (f"at most {m.max_models} models" if m.max_models else "",
                                       "" if m.sweepable else "not sweepable along α") if x)
        lines += [f"{m.name}  [{m.family}]",
                  f"    exact for permuted copies: {'yes' if m.exact_for_permuted else 'no'}"
                  + (f"; {limits}" if limits else ""),
                  f"    needs: {', '.join(sorted(m.needs)) or 'nothing but the weights it merges'}",
                  f"    paper: {m.paper}",
                  f"    about: {m.about}"]
        lines += [f"    {h.name} = {h.default!r} ({h.type.__name__}"
                  + (f": {' | '.join(map(str, h.choices))}" if h.choices else "") + f"): {h.help}"
                  for h in m.hyperparams]
    lines.append("fixes (method+fix):")
    for f in _FIXES.values():
        lines += [f"+{f.name}" + ("  [models with BatchNorm only]" if f.needs_batchnorm else ""),
                  f"    paper: {f.paper}", f"    corrects: {f.corrects}"]
    return "\n".join(lines)


# -- the methods ----------------------------------------------------------------------------------------------------

_GIT_REBASIN = "Ainsworth et al. 2023, 'Git Re-Basin: Merging Models modulo Permutation Symmetries' (ICLR 2023)"
_CCA = ("Horoi et al. 2024, 'Harmony in Diversity: Merging Neural Networks with Canonical Correlation Analysis' "
        "(ICML 2024): S_A^-1/2 Σ_AB S_B^-1/2 = U diag(ρ) Vᵀ, S = Σ + γI, T = S_A^1/2 U Vᵀ S_B^-1/2 "
        "(reference: shoroi/align-n-merge match_tensors_cca)")
_OT = ("Singh & Jaggi 2020, 'Model Fusion via Optimal Transport' (NeurIPS 2020), §4 activation-based alignment: "
       "min_Π ⟨Π, M⟩ with uniform marginals, B mapped by diag(Π·1)⁻¹Π")
_REGRESSION = ("Zou 2025, 'Model Merging and Feature Visualization in Deep Neural Networks' (thesis), §3.2.4 "
               "regression alignment (Observation 4): T = least squares of A's features on B's; used as a merge "
               "by mergescope (the thesis proposes no merge with it)")
_RIDGE = HyperParam("ridge", float, 0.1, "γ added to both covariances' diagonals")
_FRACTION = HyperParam("fraction", float, 1.0, "keep the top fraction of weights per A channel, refitted (1: all)")
_REFIT = HyperParam("refit", bool, True, "refit the kept weights on their support (fraction < 1)")
_INVERSE = HyperParam("inverse", str, "regression", "the next layer's map: B regressed on A, or T's pseudo-inverse",
                      ("regression", "pinv"))


@register_merge_method(
    "naive", family="aggregation", exact_for_permuted=False,
    paper="Wortsman et al. 2022, 'Model soups' (uniform soup θ = Σ_i w_i θ_i), the interpolation "
          "θ(α) = α·θ_A + (1−α)·θ_B of Frankle et al. 2020, 'Linear Mode Connectivity and the Lottery Ticket "
          "Hypothesis'",
    about="the weights averaged as they are, no alignment (the baseline every alignment is measured against)")
def _naive(inputs: AlignInputs) -> list[Maps]:
    return [{} for _ in inputs.models]


@register_merge_method(
    "permuted", family="alignment", needs={"matches"}, exact_for_permuted=True,
    paper=f"{_GIT_REBASIN}, activation matching (§3.1) or weight matching (Alg. 1); Jordan et al. 2023 (REPAIR), "
          "correlation matching",
    about="every model permuted onto the reference by the given matches (activation: Pearson correlation + "
          "linear_sum_assignment; or weight matching), then averaged")
def _permuted(inputs: AlignInputs) -> list[Maps]:
    from .maps import permutation_maps

    return [{}] + [permutation_maps(r.perms) for r in inputs.matches]


@register_merge_method(
    "mergemany", family="alignment", needs={"weights"}, exact_for_permuted=True, sweepable=False,
    paper=f"{_GIT_REBASIN}, Alg. 3 (MergeMany)",
    about="each model in turn weight-matched onto the average of the others until no model moves; every model, "
          "the reference too, permuted into that common space",
    hyperparams=(HyperParam("max_rounds", int, 100, "at most this many rounds over all models (the reference's "
                            "max_iter)"),
                 HyperParam("seed", int, 0, "seed of the model orders and of the weight matchings' group orders")))
def _mergemany(inputs: AlignInputs, max_rounds: int, seed: int) -> list[Maps]:
    from ..align import merge_many_matching
    from .maps import permutation_maps

    results = merge_many_matching([m.state_dict() for m in inputs.models], inputs.spec, max_rounds, seed,
                                  inputs.device)
    return [permutation_maps(r.perms) for r in results]


def _cca(stats: Mapping[str, JointMoments], ridge: float) -> Maps:
    from .cca import cca_maps

    return cca_maps(stats, ridge)[0]


def _cca_relative(stats: Mapping[str, JointMoments], ridge: float) -> Maps:
    from .cca import cca_maps

    return cca_maps(stats, ridge, relative=True)[0]


register_merge_method(
    "cca", family="map", needs={"stats:observe"}, exact_for_permuted=True, paper=_CCA,
    about="CCA merging as its reference: γ = 0.1 added to each covariance (absolute), on post-activation features",
    hyperparams=(_RIDGE,))(StatsMaps("observe", _cca))
register_merge_method(
    "cca_relative", family="map", needs={"stats:observe"}, exact_for_permuted=True, paper=_CCA,
    about="CCA merging with a relative ridge: γ = ridge × each side's mean variance (scale-free)",
    hyperparams=(HyperParam("ridge", float, 0.1, "γ as a fraction of each side's mean variance"),))(
    StatsMaps("observe", _cca_relative))


def _ot(stats: Mapping[str, JointMoments]) -> Maps:
    from .ot import ot_maps

    return ot_maps(stats)[0]


def _ot_sinkhorn(stats: Mapping[str, JointMoments], reg: float, cost: str) -> Maps:
    from .ot import ot_maps

    return ot_maps(stats, reg=reg, cost=cost)[0]


register_merge_method(
    "ot", family="map", needs={"stats:preactivation"}, exact_for_permuted=True, paper=_OT,
    about="OT fusion as its reference (sidak/otfusion's activation mode): exact OT, Euclidean distance of "
          "pre-activations; a residual stream's is its stage end's sum before the ReLU, one plan per group where "
          "the reference averages per-conv maps across skips")(StatsMaps("preactivation", _ot))
register_merge_method(
    "ot_sinkhorn", family="map", needs={"stats:observe"}, exact_for_permuted=True,
    paper=_OT + "; entropic OT by Sinkhorn (Cuturi 2013)",
    about="OT fusion with 1 − correlation of post-activations and Sinkhorn (ε = reg × mean cost)",
    hyperparams=(HyperParam("reg", float, 0.01, "entropic regularization ε relative to the mean cost (0: exact)"),
                 HyperParam("cost", str, "correlation", "the ground metric between two channels' features",
                            ("correlation", "euclidean", "sqeuclidean"))))(StatsMaps("observe", _ot_sinkhorn))


def _regression(stats: Mapping[str, JointMoments], fraction: float, refit: bool, inverse: str) -> Maps:
    from .regression_merge import regression_maps

    return regression_maps(stats, fraction, refit, None, inverse)[0]  # ridge None: 0.1·(1 − R²) per channel


def _regression_ols(stats: Mapping[str, JointMoments], fraction: float, refit: bool, inverse: str,
                    ridge: float) -> Maps:
    from .regression_merge import regression_maps

    return regression_maps(stats, fraction, refit, ridge, inverse)[0]


register_merge_method(
    "regression", family="map", needs={"stats:observe"}, exact_for_permuted=True, paper=_REGRESSION,
    about="each group's least-squares map of A's features on B's, ridge 0.1·(1 − R²) per channel (vanishes on an "
          "exact fit): plain least squares puts large weights on rarely firing B channels",
    hyperparams=(_FRACTION, _REFIT, _INVERSE))(StatsMaps("observe", _regression))
register_merge_method(
    "regression_ols", family="map", needs={"stats:observe"}, exact_for_permuted=True, paper=_REGRESSION,
    about="regression merging with plain least squares (no ridge): large weights on rarely firing B channels "
          "flood nets without BatchNorm",
    hyperparams=(_FRACTION, _REFIT, _INVERSE,
                 HyperParam("ridge", float, 0.0, "uniform relative ridge (0: ordinary least squares)")))(
    StatsMaps("observe", _regression_ols))


@register_merge_method(
    "zipit", family="map", needs={"stats:observe"}, exact_for_permuted=True, max_models=2, sweepable=False,
    uses_weights=True,
    paper="Stoica et al. 2024, 'ZipIt! Merging Models from Different Tasks without Training' (ICLR 2024), the "
          "greedy matching of Sec. 4.3 (reference: gstoica27/ZipIt match_tensors_zipit)",
    about="features of both models zipped by correlation, within-model merges allowed, into a space neither "
          "model owns; the merged mean weighs the models by the merge weights",
    hyperparams=(HyperParam("a", float, 0.3, "the paper's α: factor on a merged feature's similarities (≤ 0: never "
                            "merged again with its own models' features)"),
                 HyperParam("b", float, 0.125, "the paper's β: within-model merge budget per model, as a fraction "
                            "of C/2")))
def _zipit(inputs: AlignInputs, a: float, b: float) -> list[Maps]:
    from .zipit import zipit_maps

    alpha = 0.5 if inputs.weights is None else inputs.weights[0] / sum(inputs.weights)
    maps_a, maps_b, _ = zipit_maps(inputs.stats["observe"][0], alpha, a, b)
    return [maps_a, maps_b]
