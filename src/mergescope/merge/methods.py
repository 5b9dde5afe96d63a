"""The merge-method registry: every way of making one model of several, registered once with its paper.

A *merge method* (a base) has two steps: an *alignment* step says how each model is mapped into the merged
channel space (per model, group -> :class:`~mergescope.merge.maps.ChannelMap`; the identity for methods that
assume one shared space), and a *combine* step makes one model of the mapped models. The default combine step
is the weighted sum of the mapped models, θ = Σ_k w_k·T_k(θ_k) (:func:`mergescope.merge.maps.merge_models_with_maps`)
— every alignment and map method uses it. Aggregation methods bring their own (``combine``: task vectors over a
shared base, Fisher or RegMean weightings, soups), and ensembles return an :class:`~mergescope.merge.ensemble.Ensemble`
module instead of a weight merge. :meth:`MergeMethod.merge` runs both steps and returns the model; calling the
method runs the alignment step only (its maps).

A method is a :class:`MergeMethod`: its family (:data:`FAMILIES`), the paper and equation it implements, the inputs
it needs (:data:`NEEDS`), typed hyperparameters with the reference's defaults, how it treats BatchNorm running
statistics (:data:`BATCHNORM`), and whether merging a model with a permuted copy of itself gives that model's
function back (asserted for every method by ``tests/test_method_registry.py``, which also merges every method's
model with itself: :attr:`MergeMethod.identity_params`). A *fix* (:class:`Fix`: REPAIR, RESET) is applied after
the merge.

**Method strings** (:func:`get_merge_method`): a registered name (``"ties"``), or an alignment composed with an
aggregation as ``"<alignment>><aggregation>"`` (``"permuted>ties"``: every model permuted onto the reference by
the given matches, weight or activation matching, then TIES-merged in the reference's space). ``>`` reads "then",
and binds tighter than a fix's ``+``, which stays last: ``"permuted>ties+reset"`` is (permuted, then TIES), then
RESET, the same ``base+fix`` shape :mod:`mergescope.merge.recipes` splits on ``+``; neither character can be in a
registered name. The composed method runs the alignment at its defaults and takes the aggregation's
hyperparameters; a shared base (task vectors) is read in the reference's space as given, so such an aggregation
only composes with an alignment that keeps the reference's channels (``permuted``, ``ste``; not ``mergemany``).

Registering, in the spirit of timm's model registry::

    @register_merge_method("mine", family="map", paper="...", about="...", needs={"stats:observe"},
                           exact_for_permuted=True, hyperparams=(HyperParam("ridge", float, 0.1, "..."),))
    def _mine(inputs: AlignInputs, ridge: float) -> list[Maps]:
        ...

    get_merge_method("cca")(inputs)                  # per model (reference first) its maps; defaults filled in
    get_merge_method("cca")(inputs, ridge=1.0)
    get_merge_method("ties").merge(AlignInputs(models, spec, base=base), k=0.2)   # the merged model
    get_merge_method("permuted>ties").merge(AlignInputs(models, spec, matches=matches, base=base))

An aggregation method registers its combine step (``(AlignInputs, weights, **hyperparams) -> nn.Module``, the
models already in the merged space, the weights normalized to sum to 1)::

    @register_merge_method("mine", family="aggregation", paper="...", about="...", needs={"base"},
                           exact_for_permuted=False, combine=True, hyperparams=(...,))
    def _mine(inputs: AlignInputs, weights: list[float], lam: float) -> nn.Module:
        ...

This module imports no torch at import time (the command line builds its help from it); each method's code is
imported when it runs.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..errors import MergescopeError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..align import MatchResult
    from ..align.covariance import JointMoments
    from ..perm import PermSpec
    from .maps import ChannelMap, MapLayout

    Maps = dict[str, ChannelMap]  # group -> map of one model's channels into the merged space ({}: identity)

FAMILIES = ("ensemble", "aggregation", "alignment", "map")
NEEDS = ("matches", "weights", "stats:observe", "stats:preactivation",  # what the merge plan gives today
         "base", "data", "heldout", "sample_counts")  # more of AlignInputs (the fields of these names)
BATCHNORM = {  # how a method treats BatchNorm running statistics (MergeMethod.batchnorm)
    "carry": "combined as the method combines the other tensors (averaged; refolded under a general map; an "
             "ensemble's members keep their own)",
    "reset": "recomputed on the data after the merge (RESET's pass)",
    "repair": "REPAIR: the merged channels' statistics renormalized to the endpoints' (the +repair fixes)",
}
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


Batches = Callable[[], Iterable]  # makes a fresh iterable of batches (.x, .y), e.g. lambda: iter_batches(ds, 500)


@dataclass
class AlignInputs:
    """What a method may read; only the fields its method ``needs`` must be given."""

    models: Sequence[nn.Module]  # reference first
    spec: PermSpec
    matches: Sequence[MatchResult] | None = None  # models[1:] matched to models[0] ("matches")
    stats: Mapping[str, Sequence[Mapping[str, JointMoments]]] | None = None  # place -> per other model -> group
    device: torch.device | str = "cpu"
    weights: Sequence[float] | None = None  # the merge weights (maps that depend on them, zipit; combine steps)
    base: nn.Module | None = None  # the shared base the models were fine-tuned from ("base": task vectors)
    data: Batches | Sequence[Batches] | None = None  # "data": one factory for all, or one per model (its own data)
    heldout: Callable[[nn.Module], float] | None = None  # "heldout": a model's held-out score (soups.heldout_accuracy)
    sample_counts: Sequence[int] | None = None  # "sample_counts": each model's number of training examples (FedAvg)

    def data_for(self, k: int) -> Iterable:
        """Model k's batches: its own factory's when ``data`` is one per model, else the shared one's."""
        return self.data[k]() if isinstance(self.data, Sequence) else self.data()

    def all_data(self) -> Iterable:
        """Every model's batches one after the other (the shared factory's once)."""
        if not isinstance(self.data, Sequence):
            return self.data()
        return (b for make in self.data for b in make())


_INPUTS = {  # a need beyond the plan's (the AlignInputs field of that name) -> what it is, for the one-line error
    "base": "the shared base model the models were fine-tuned from (task vectors are θ_k − θ_base)",
    "data": "batches of data (a factory, or one per model)",
    "heldout": "a held-out score of a model (e.g. merge.soups.heldout_accuracy(dataset))",
    "sample_counts": "each model's number of training examples",
}


@dataclass(frozen=True)
class MergeMethod:
    """One merge method (a base): how every model is mapped into the merged space, and how the mapped models are
    combined, with its paper.

    Call it with :class:`AlignInputs` (and hyperparameters by name) for the per-model maps, reference first;
    :meth:`merge` for the merged model.
    """

    name: str
    family: str  # one of FAMILIES
    paper: str  # citation: authors year, title, and the equation/algorithm used
    about: str  # what this variant does and how it differs from the paper's default, if it does
    needs: frozenset[str]  # what it reads of AlignInputs, from NEEDS
    exact_for_permuted: bool  # merging a model with a permuted copy of itself returns that model's function
    max_models: int | None  # at most this many models (None: any number)
    sweepable: bool  # the reference's maps are the identity: it can be swept along α with the reference moving
    hyperparams: tuple[HyperParam, ...]
    align: Callable[..., list[Maps]]  # (AlignInputs[, **hyperparams]) -> per model its maps into the merged space
    uses_weights: bool = False  # its maps depend on the merge weights (AlignInputs.weights), as ZipIt!'s do
    combine: Callable[..., nn.Module] | None = None  # (AlignInputs, weights, **hyperparams) -> the merged model;
    # None: the weighted sum of the mapped models. With a combine step the hyperparameters are the combine step's.
    batchnorm: str = "carry"  # how BatchNorm running statistics are treated, a key of BATCHNORM
    identity_params: Callable[[int], dict[str, Any]] | None = None  # n -> the hyperparameters under which merging
    # n copies of one model returns it (θ_base + λ·Σ τ_k is θ only for λ = 1/n); None: the defaults do

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

    @property
    def plan_ready(self) -> bool:
        """Whether the merge plan as it is (:func:`mergescope.studies.plan.execute_plan`: the weighted sum of the
        mapped models, from matches, the models' weights and joint statistics) runs it."""
        return self.combine is None and not self.needs & set(_INPUTS)

    def _check_align_inputs(self, inputs: AlignInputs) -> None:
        n = len(inputs.models)
        self.check_models(n)
        if "matches" in self.needs and (inputs.matches is None or len(inputs.matches) != n - 1):
            raise ValueError(f"{self.name} needs the matches of the {n - 1} other models to the reference")
        for place in self.places():
            if inputs.stats is None or len(inputs.stats.get(place, ())) != n - 1:
                raise ValueError(f"{self.name} needs the joint statistics at '{place}' of the {n - 1} other models")
        if self.combine is None:  # every need is the alignment step's
            self._check_combine_inputs(inputs)

    def _check_combine_inputs(self, inputs: AlignInputs) -> None:
        n = len(inputs.models)
        for need in self.needs & set(_INPUTS):
            value = getattr(inputs, need)
            if value is None:
                raise MergescopeError(f"{self.name} needs {_INPUTS[need]}: AlignInputs.{need} is not given")
            if need in ("sample_counts", "data") and isinstance(value, Sequence) and len(value) != n:
                raise MergescopeError(f"{self.name}: AlignInputs.{need} needs one entry per model ({n}), "
                                      f"got {len(value)}")
            if need == "data" and not all(map(callable, value if isinstance(value, Sequence) else [value])):
                raise MergescopeError(f"{self.name}: AlignInputs.data must make the batches (e.g. lambda: "
                                      "iter_batches(dataset, 500)), or be one such function per model")

    def __call__(self, inputs: AlignInputs, **params: Any) -> list[Maps]:
        """Per model (reference first), its maps into the merged space (a method with a combine step: its
        hyperparameters are checked, and its alignment step takes none)."""
        self._check_align_inputs(inputs)
        hp = self.resolve(params)
        return self.align(inputs) if self.combine is not None else self.align(inputs, **hp)

    def merge(self, inputs: AlignInputs, maps: Sequence[Maps] | None = None, layout: MapLayout | None = None,
              **params: Any) -> nn.Module:
        """The merged model: the alignment step (or the given ``maps``), then the combine step.

        Args:
            inputs: the models (reference first) and what this method ``needs``; ``inputs.weights``: the merge
                weights (None: equal; a combine step gets them normalized to sum to 1).
            maps: the alignment step's maps, if already computed (the merge plan computes them once per method).
            layout: :func:`mergescope.merge.maps.map_layout` of the architecture (computed if needed).
            params: hyperparameters by name (the defaults are the reference's).

        Returns:
            A new model (the inputs are untouched): the architecture of ``inputs.models[0]``, or an
            :class:`~mergescope.merge.ensemble.Ensemble` for family ``"ensemble"``.
        """
        from .aggregate import normalized
        from .maps import map_layout, map_model, merge_models_with_maps

        self._check_align_inputs(inputs)
        self._check_combine_inputs(inputs)
        hp = self.resolve(params)
        n = len(inputs.models)
        maps = list(maps) if maps is not None else self(inputs, **params)
        if len(maps) != n:
            raise ValueError(f"{self.name}: {len(maps)} map sets for {n} models")
        if self.combine is None:
            weights = list(inputs.weights) if inputs.weights is not None else [1.0 / n] * n
            return merge_models_with_maps(inputs.models, weights, maps, layout)
        if any(maps):
            layout = layout or map_layout(inputs.models[0], inputs.spec)
            inputs = replace(inputs, models=[map_model(m, mp, layout) if mp else m
                                             for m, mp in zip(inputs.models, maps)])
        return self.combine(inputs, normalized(inputs.weights, n), **hp)


@dataclass(frozen=True)
class StatsMaps:
    """The alignment step of a method that maps each other model into the reference's space from that model's own
    joint statistics with the reference at one place (the reference keeps its channels: identity maps)."""

    place: str  # "observe" or "preactivation"
    fit: Callable[..., Maps]  # ({group: JointMoments}, **hyperparams) -> the model's maps into the reference's space

    def __call__(self, inputs: AlignInputs, **hp: Any) -> list[Maps]:
        return [{}] + [self.fit(stats, **hp) for stats in inputs.stats[self.place]]


_METHODS: dict[str, MergeMethod] = {}


def _shared_space(inputs: AlignInputs) -> list[Maps]:
    """The alignment step of a method that assumes the models share one space: identity maps."""
    return [{} for _ in inputs.models]


def register_merge_method(name: str, *, family: str, paper: str, about: str, needs: Iterable[str] = (),
                          exact_for_permuted: bool, max_models: int | None = None, sweepable: bool = True,
                          hyperparams: Sequence[HyperParam] = (), uses_weights: bool = False, combine: bool = False,
                          batchnorm: str = "carry",
                          identity_params: Callable[[int], dict[str, Any]] | None = None) -> Callable:
    """Decorator: register the step below it as merge method ``name``; returns it unchanged. It is the alignment
    step (``(AlignInputs, **hyperparams) -> list[Maps]``, or a :class:`StatsMaps`), or with ``combine=True`` the
    combine step (``(AlignInputs, weights, **hyperparams) -> nn.Module``; the alignment step is then the identity).
    A name registered twice is an error."""

    def register(step: Callable) -> Callable:
        align, comb = (_shared_space, step) if combine else (step, None)
        method = MergeMethod(name, family, paper, about, frozenset(needs), exact_for_permuted, max_models,
                             sweepable, tuple(hyperparams), align, uses_weights, comb, batchnorm, identity_params)
        if name in _METHODS:
            raise ValueError(f"merge method '{name}' is already registered")
        if "+" in name or ">" in name or not name:
            raise ValueError(f"a merge method's name must be non-empty and without '+' or '>', got '{name}'")
        if family not in FAMILIES:
            raise ValueError(f"{name}: family must be one of {', '.join(FAMILIES)}, got '{family}'")
        if not method.needs <= set(NEEDS):
            raise ValueError(f"{name}: needs must be a subset of {', '.join(NEEDS)}, got {sorted(method.needs)}")
        if batchnorm not in BATCHNORM:
            raise ValueError(f"{name}: batchnorm must be one of {', '.join(BATCHNORM)}, got '{batchnorm}'")
        _METHODS[name] = method
        return step

    return register


def get_merge_method(name: str) -> MergeMethod:
    """The registered method ``name``, or the composition ``"<alignment>><aggregation>"`` (module docstring); an
    unknown name is a one-line error listing the known ones."""
    if ">" in name:
        return _composed(*name.split(">", 1))
    if name not in _METHODS:
        raise MergescopeError(f"unknown merge method '{name}'; known: {', '.join(_METHODS)}")
    return _METHODS[name]


@functools.lru_cache(maxsize=None)
def _composed(align_name: str, combine_name: str) -> MergeMethod:
    """``align_name`` (family "alignment", at its defaults), then ``combine_name`` (family "aggregation")."""
    name = f"{align_name}>{combine_name}"
    if ">" in combine_name:
        raise MergescopeError(f"'{name}': one alignment, then one aggregation (a single '>')")
    first, then = get_merge_method(align_name), get_merge_method(combine_name)
    aligners = list_merge_methods("alignment")
    if first.family != "alignment":
        raise MergescopeError(f"'{name}': the part before '>' must be an alignment method ({', '.join(aligners)}), "
                              f"got '{align_name}'")
    if then.family != "aggregation":
        raise MergescopeError(f"'{name}': the part after '>' must be an aggregation method "
                              f"({', '.join(list_merge_methods('aggregation'))}), got '{combine_name}'")
    if "base" in then.needs and not first.sweepable:
        raise MergescopeError(f"'{name}': {combine_name} reads the shared base in the reference's space, and "
                              f"{align_name} moves the reference; use one of "
                              f"{', '.join(a for a in aligners if get_merge_method(a).sweepable)}")
    max_models = min((m for m in (first.max_models, then.max_models) if m is not None), default=None)
    exact = first.exact_for_permuted and then.identity_params is None and then.batchnorm != "reset"
    return MergeMethod(name, "aggregation", f"{first.paper}; then {then.paper}",
                       f"{align_name} (at its defaults), then {combine_name}: {then.about}",
                       first.needs | then.needs, exact, max_models, False, then.hyperparams, first,
                       first.uses_weights, then.combine, then.batchnorm, then.identity_params)


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


def methods_help(default: str | None = None, exclude: Iterable[str] = (), combining: bool = False) -> str:
    """The command line's ``--methods`` help: every base not in ``exclude`` (with its model limit), the fixes;
    the methods the merge plan cannot run (:attr:`MergeMethod.plan_ready`: aggregation, ensembles, the learned
    permutations) only with ``combining`` (for a command that runs :meth:`MergeMethod.merge`)."""
    exclude = set(exclude)
    bases = " ".join(n + (f" (at most {m.max_models} models)" if m.max_models else "")
                     for n, m in _METHODS.items() if n not in exclude and (combining or m.plan_ready))
    head = f"default: {default}; " if default else ""
    return (f"{head}any of the bases {bases}, alone or with {', '.join('+' + f for f in _FIXES)} "
            "(e.g. cca+repair)")


def methods_table() -> str:
    """A plain-text listing of every method and fix: family, exact for permuted copies, needs, BatchNorm
    statistics, inference cost, paper, hyperparameters with defaults (``mergescope methods``)."""
    lines = []
    for m in _METHODS.values():
        limits = ", ".join(x for x in (f"at most {m.max_models} models" if m.max_models else "",
                                       "" if m.sweepable else "not sweepable along α") if x)
        cost = ("N models run side by side: N× the parameters and FLOPs of one" if m.family == "ensemble"
                else "one model of the same architecture")
        lines += [f"{m.name}  [{m.family}]",
                  f"    exact for permuted copies: {'yes' if m.exact_for_permuted else 'no'}"
                  + (f"; {limits}" if limits else ""),
                  f"    needs: {', '.join(sorted(m.needs)) or 'nothing but the weights it merges'}",
                  f"    batchnorm: {m.batchnorm}: {BATCHNORM[m.batchnorm]}",
                  f"    result: {cost}" + ("" if m.combine is None else "; combines the models itself "
                                                                          "(MergeMethod.merge)"),
                  f"    paper: {m.paper}",
                  f"    about: {m.about}"]
        lines += [f"    {h.name} = {h.default!r} ({h.type.__name__}"
                  + (f": {' | '.join(map(str, h.choices))}" if h.choices else "") + f"): {h.help}"
                  for h in m.hyperparams]
    lines.append("compositions: <alignment>><aggregation>[+fix], e.g. permuted>ties+reset (alignment: "
                 f"{', '.join(list_merge_methods('alignment'))}; aggregation: any of "
                 f"{', '.join(list_merge_methods('aggregation'))})")
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


@register_merge_method(
    "ste", family="alignment", needs={"weights", "data"}, exact_for_permuted=True,
    paper=f"{_GIT_REBASIN}, §3.3 and Alg. 2 (learned permutations by a straight-through estimator; reference: "
          "samuela/git-re-basin mnist_mlp_ste2.py)",
    about="free weights from A, projected on B's permutations by weight matching each step, SGD on the midpoint's "
          "loss through the projection; the best step's permutation. Each other model on its own, on every "
          "model's batches (AlignInputs.data), the midpoint's BatchNorms on batch statistics; 10 epochs where the "
          "reference trains 250 (pass epochs=250 for its budget)",
    hyperparams=(HyperParam("epochs", int, 10, "passes over the data (the reference: 250 on MNIST)"),
                 HyperParam("lr", float, 0.01, "SGD learning rate on the free weights (the reference's MNIST value)"),
                 HyperParam("momentum", float, 0.9, "SGD momentum (the reference's)"),
                 HyperParam("seed", int, 0, "seed of the weight matchings (step t: seed + t)")))
def _ste(inputs: AlignInputs, epochs: int, lr: float, momentum: float, seed: int) -> list[Maps]:
    from .maps import permutation_maps
    from .ste import straight_through_matching

    ref = inputs.models[0]
    return [{}] + [permutation_maps(straight_through_matching(ref, m, inputs.spec, inputs.all_data, epochs, lr,
                                                              momentum, seed, inputs.device).perms)
                   for m in inputs.models[1:]]


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


# -- aggregation: the models share one space and are combined by the method's own rule -----------------------------

_SOUPS = ("Wortsman et al. 2022, 'Model soups: averaging weights of multiple fine-tuned models improves accuracy "
          "without increasing inference time' (ICML 2022)")
_TASK_ARITHMETIC = "Ilharco et al. 2023, 'Editing Models with Task Arithmetic' (ICLR 2023)"
_LAM_HELP = ("λ in θ = θ_base + λ·τ (task_arithmetic's default; the papers select it on validation data)")


def _one_over_n(n: int) -> dict[str, Any]:
    return {"lam": 1.0 / n}


def _mean_of(inputs: AlignInputs, weights: Sequence[float] | None) -> nn.Module:
    from .aggregate import weighted_average, with_state

    return with_state(inputs.models[0], weighted_average([m.state_dict() for m in inputs.models], weights))


@register_merge_method(
    "average", family="aggregation", combine=True, exact_for_permuted=False, sweepable=False,
    paper="simple averaging (survey 003 §4.1): θ = (1/N) Σ_k θ_k, the uniform mean of FedSGD-style one-shot "
          "averaging (McMahan et al. 2017, 'Communication-Efficient Learning of Deep Networks from Decentralized "
          "Data', AISTATS 2017)",
    about="the uniform mean of every tensor, whatever the merge weights (naive weighs them); BatchNorm statistics "
          "averaged like the rest")
def _average(inputs: AlignInputs, weights: list[float]) -> nn.Module:
    return _mean_of(inputs, None)


@register_merge_method(
    "fedavg", family="aggregation", combine=True, needs={"sample_counts"}, exact_for_permuted=False, sweepable=False,
    paper="McMahan et al. 2017, 'Communication-Efficient Learning of Deep Networks from Decentralized Data' "
          "(AISTATS 2017), FederatedAveraging's server step (Alg. 1): θ = Σ_k (n_k / n) θ_k",
    about="each model weighted by its number of training examples (AlignInputs.sample_counts), not by the merge "
          "weights; one round, BatchNorm statistics averaged with the same weights")
def _fedavg(inputs: AlignInputs, weights: list[float]) -> nn.Module:
    from .aggregate import fedavg_weights

    return _mean_of(inputs, fedavg_weights(list(inputs.sample_counts)))


@register_merge_method(
    "swa", family="aggregation", combine=True, needs={"data"}, exact_for_permuted=False, sweepable=False,
    batchnorm="reset",
    paper="Izmailov et al. 2018, 'Averaging Weights Leads to Wider Optima and Better Generalization' (UAI 2018), "
          "Alg. 1: θ_SWA = (1/n) Σ_i θ_i over checkpoints of one run, then one pass over the data to recompute "
          "the BatchNorm statistics",
    about="the uniform mean of the given checkpoints (models, in any order), BatchNorm running statistics "
          "recomputed on AlignInputs.data (every model's batches; RESET's pass)")
def _swa(inputs: AlignInputs, weights: list[float]) -> nn.Module:
    from .aggregate import recompute_batchnorm

    return recompute_batchnorm(_mean_of(inputs, None), inputs.all_data(), inputs.device)


@register_merge_method(
    "uniform_soup", family="aggregation", combine=True, exact_for_permuted=False, sweepable=False,
    paper=f"{_SOUPS}, the uniform soup: θ = (1/N) Σ_k θ_k over fine-tunes of one pre-trained model",
    about="the same mean as average (listed under the soups' name beside greedy_soup); BatchNorm statistics "
          "averaged like the rest")
def _uniform_soup(inputs: AlignInputs, weights: list[float]) -> nn.Module:
    return _mean_of(inputs, None)


@register_merge_method(
    "greedy_soup", family="aggregation", combine=True, needs={"heldout"}, exact_for_permuted=True, sweepable=False,
    paper=f"{_SOUPS}, Recipe 1 (greedy soup): ingredients by decreasing held-out accuracy, each added iff the "
          "soup's held-out accuracy does not drop",
    about="AlignInputs.heldout scores each candidate (e.g. merge.soups.heldout_accuracy on a held-out split); "
          "never below its best ingredient there. Exact for a permuted copy because averaging with it lowers the "
          "held-out accuracy, so it is left out")
def _greedy_soup(inputs: AlignInputs, weights: list[float]) -> nn.Module:
    from .aggregate import with_state
    from .soups import greedy_soup

    ref = inputs.models[0]
    state, _ = greedy_soup([m.state_dict() for m in inputs.models], lambda st: inputs.heldout(with_state(ref, st)))
    return with_state(ref, state)


def _task_vector_merge(inputs: AlignInputs, weights: Sequence[float], lam: float, merged: Callable) -> nn.Module:
    """θ = θ_base + λ·merged(τ_1..τ_N) on the parameters; buffers (BatchNorm statistics) averaged with the merge
    weights ("carry": a task vector of a variance can make it negative)."""
    from .aggregate import parameter_names, weighted_average, with_state
    from .task_vectors import apply_task_vector, task_vectors

    ref = inputs.models[0]
    states = [m.state_dict() for m in inputs.models]
    base = {k: v.to(states[0][k].device) if k in states[0] else v for k, v in inputs.base.state_dict().items()}
    state = weighted_average(states, weights)
    state.update(apply_task_vector(base, merged(task_vectors(states, base, parameter_names(ref))), lam))
    return with_state(ref, state)


@register_merge_method(
    "task_arithmetic", family="aggregation", combine=True, needs={"base"}, exact_for_permuted=False, sweepable=False,
    identity_params=_one_over_n,
    paper=f"{_TASK_ARITHMETIC}, §2 (addition): θ = θ_base + λ Σ_k τ_k, τ_k = θ_k − θ_base",
    about="task vectors of the parameters from the shared base (AlignInputs.base); BatchNorm statistics averaged "
          "with the merge weights, not task-vectored",
    hyperparams=(HyperParam("lam", float, 0.3, "λ, the scaling of the summed task vectors (a common default; the "
                            "paper selects λ in [0, 1] on validation data)"),))
def _task_arithmetic(inputs: AlignInputs, weights: list[float], lam: float) -> nn.Module:
    from .task_vectors import summed

    return _task_vector_merge(inputs, weights, lam, summed)


@register_merge_method(
    "ties", family="aggregation", combine=True, needs={"base"}, exact_for_permuted=False, sweepable=False,
    identity_params=lambda n: {"k": 1.0},
    paper="Yadav et al. 2023, 'TIES-Merging: Resolving Interference When Merging Models' (NeurIPS 2023), Alg. 1: "
          "trim each τ_k to its top-k% magnitudes, elect γ = sgn(Σ_k τ̂_k) (the larger mass), disjoint mean of the "
          "τ̂_k agreeing with γ, θ = θ_base + λ·τ (reference: prateeky2806/ties-merging)",
    about="top-k over all of a task vector's parameters at once, as the reference; BatchNorm statistics averaged "
          "with the merge weights",
    hyperparams=(HyperParam("k", float, 0.2, "the fraction of each task vector's entries kept by magnitude (the "
                            "paper's k = 20%)"),
                 HyperParam("lam", float, 1.0, "λ on the merged task vector (the paper's default without "
                            "validation data)")))
def _ties(inputs: AlignInputs, weights: list[float], k: float, lam: float) -> nn.Module:
    from .task_vectors import ties_vector

    return _task_vector_merge(inputs, weights, lam, lambda taus: ties_vector(taus, k))


@register_merge_method(
    "dare", family="aggregation", combine=True, needs={"base"}, exact_for_permuted=False, sweepable=False,
    identity_params=lambda n: {"p": 0.0, "lam": 1.0 / n},
    paper="Yu et al. 2024, 'Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free "
          "Lunch' (ICML 2024), Eq. 1 (DARE: drop each delta entry with rate p, rescale the rest by 1/(1 − p)), "
          "then task arithmetic: θ = θ_base + λ Σ_k τ̃_k",
    about="the drops drawn from a generator seeded by seed (model by model, parameter by parameter), so a merge "
          "is reproducible; BatchNorm statistics averaged with the merge weights",
    hyperparams=(HyperParam("p", float, 0.9, "the drop rate (90%: the paper finds most fine-tuning deltas survive "
                            "it)"),
                 HyperParam("lam", float, 0.3, _LAM_HELP),
                 HyperParam("seed", int, 0, "seed of the Bernoulli drops")))
def _dare(inputs: AlignInputs, weights: list[float], p: float, lam: float, seed: int) -> nn.Module:
    import torch

    from .task_vectors import dare, summed

    def merged(taus):
        gen = torch.Generator().manual_seed(seed)
        return summed([dare(t, p, gen) for t in taus])

    return _task_vector_merge(inputs, weights, lam, merged)


@register_merge_method(
    "breadcrumbs", family="aggregation", combine=True, needs={"base"}, exact_for_permuted=False, sweepable=False,
    identity_params=lambda n: {"beta": 0.0, "gamma": 1.0, "lam": 1.0 / n},
    paper="Davari & Belilovsky 2024, 'Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks' "
          "(ECCV 2024), §3: per layer, mask the task vector's entries below the β and above the γ magnitude "
          "percentile, then θ = θ_base + λ Σ_k m_k ⊙ τ_k",
    about="per parameter tensor: the ⌊β·n⌋ smallest and ⌊(1 − γ)·n⌋ largest magnitudes masked; BatchNorm "
          "statistics averaged with the merge weights",
    hyperparams=(HyperParam("beta", float, 0.85, "fraction of smallest magnitudes masked per layer (the paper's β)"),
                 HyperParam("gamma", float, 0.993, "magnitude percentile above which entries are masked (the "
                            "paper's γ: the top 0.7% go)"),
                 HyperParam("lam", float, 0.3, _LAM_HELP)))
def _breadcrumbs(inputs: AlignInputs, weights: list[float], beta: float, gamma: float, lam: float) -> nn.Module:
    from .task_vectors import breadcrumbs_mask, summed

    return _task_vector_merge(inputs, weights, lam, lambda taus: summed([breadcrumbs_mask(t, beta, gamma)
                                                                          for t in taus]))


@register_merge_method(
    "fisher", family="aggregation", combine=True, needs={"data"}, exact_for_permuted=False, sweepable=False,
    paper="Matena & Raffel 2022, 'Merging Models with Fisher-Weighted Averaging' (NeurIPS 2022), Eq. 4: "
          "θ* = Σ_k λ_k F_k θ_k / Σ_k λ_k F_k with the diagonal Fisher F_k = E_x E_{y~p_θk} (∇ log p_θk(y|x))²",
    about="each model's Fisher on its own batches (AlignInputs.data, or the shared ones), the expectation over the "
          "classes exact (the reference's default), floored at ε; λ_k: the merge weights; BatchNorm statistics "
          "averaged with them",
    hyperparams=(HyperParam("examples", int, 4096, "at most this many images per model for its Fisher (mergescope's "
                            "choice; the reference takes a number of examples as a setting)"),
                 HyperParam("floor", float, 1e-6, "ε: F_k floored at it (the reference's fisher_floor)"))
)
def _fisher(inputs: AlignInputs, weights: list[float], examples: int, floor: float) -> nn.Module:
    from .aggregate import weighted_average, with_state
    from .fisher import diagonal_fisher, fisher_average

    states = [m.state_dict() for m in inputs.models]
    fishers = [diagonal_fisher(m, inputs.data_for(k), examples, inputs.device) for k, m in enumerate(inputs.models)]
    state = weighted_average(states, weights)
    state.update(fisher_average(states, fishers, weights, floor))
    return with_state(inputs.models[0], state)


@register_merge_method(
    "regmean", family="aggregation", combine=True, needs={"data"}, exact_for_permuted=False, sweepable=False,
    paper="Jin et al. 2023, 'Dataless Knowledge Fusion by Merging Weights of Language Models' (ICLR 2023), §3: per "
          "linear/conv layer W* = (Σ_k G̃_k)⁻¹ Σ_k G̃_k W_k with G̃_k the input Gram matrix, off-diagonals × α "
          "(reference: bloomberg/dataless-model-merging)",
    about="every nn.Linear and conv (groups 1) on each model's own batches (AlignInputs.data), convs on unfolded "
          "patches; biases and BatchNorm statistics averaged with the merge weights",
    hyperparams=(HyperParam("alpha", float, 0.9, "the scaling of the Gram matrices' off-diagonal entries (the "
                            "reference's 0.9)"),))
def _regmean(inputs: AlignInputs, weights: list[float], alpha: float) -> nn.Module:
    from .aggregate import weighted_average, with_state
    from .regmean import input_grams, regmean_state

    states = [m.state_dict() for m in inputs.models]
    grams = [input_grams(m, inputs.data_for(k), device=inputs.device) for k, m in enumerate(inputs.models)]
    state = weighted_average(states, weights)
    state.update(regmean_state(states, grams, alpha, weights))
    return with_state(inputs.models[0], state)


# -- ensembles: not a weight merge ----------------------------------------------------------------------------------

def _ensemble(inputs: AlignInputs, weights: list[float], output: str) -> nn.Module:
    import copy

    from .ensemble import Ensemble

    return Ensemble([copy.deepcopy(m) for m in inputs.models], weights, output).eval()


_ENSEMBLE = ("output ensembling (survey 003 §3, Table 1; the ceiling the merging papers report, e.g. ZipIt!'s and "
             "Git Re-Basin's ensemble rows)")


@register_merge_method(
    "logit_ensemble", family="ensemble", combine=True, exact_for_permuted=True, sweepable=False,
    paper=f"{_ENSEMBLE}: z(x) = Σ_k w_k z_k(x)",
    about="the merge-weighted mean of the models' logits, an Ensemble module of copies of the models (N× the "
          "parameters and FLOPs: merge.ensemble.inference_cost); each member keeps its BatchNorm statistics")
def _logit_ensemble(inputs: AlignInputs, weights: list[float]) -> nn.Module:
    return _ensemble(inputs, weights, "logits")


@register_merge_method(
    "prob_ensemble", family="ensemble", combine=True, exact_for_permuted=True, sweepable=False,
    paper=f"{_ENSEMBLE}: p(x) = Σ_k w_k softmax(z_k(x)), returned as log p(x)",
    about="the merge-weighted mean of the models' probabilities, as log-probabilities (logits of the mean), an "
          "Ensemble module of copies of the models (N× the parameters and FLOPs); each member keeps its BatchNorm "
          "statistics")
def _prob_ensemble(inputs: AlignInputs, weights: list[float]) -> nn.Module:
    return _ensemble(inputs, weights, "probs")
