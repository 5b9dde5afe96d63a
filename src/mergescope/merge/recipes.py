"""Merge methods by name, as the studies and the CLI spell them: ``base`` or ``base+fix``, both from the registry
(:mod:`mergescope.merge.methods`).

A method is a *base* — how the models are put into one channel space (:func:`list_merge_methods`) — optionally
followed by a *fix* (:func:`list_fixes`):

* bases: ``naive`` (no alignment), ``permuted`` (activation or weight matching onto the reference),
  ``mergemany`` (Git Re-Basin's MergeMany: every model weight-matched onto the average of the others), and the
  map-based ``cca``, ``ot``, ``regression`` (a per-group linear map fitted on joint feature statistics; each
  default as its reference, with named variants ``cca_relative``, ``ot_sinkhorn``, ``regression_ols``:
  :data:`MAP_METHODS`) and ``zipit`` (feature zipping, also within one model; two models at a time);
* fixes: ``+repair`` (REPAIR towards the mapped endpoints' channel statistics, :func:`repair_many`, at the
  points REPAIR's reference corrects: on a residual net every block output through an added layer, and every
  BatchNorm reset), ``+repair_preact`` (REPAIR of the pre-activation outputs only, fused: the original
  architecture; the same as ``+repair`` on non-residual nets) or ``+reset`` (BatchNorm statistics recomputed;
  models with BatchNorm only).

E.g. ``permuted+repair`` is REPAIR's method, ``cca+repair`` CCA merging followed by REPAIR.

:data:`BASES` are the bases the merge plan runs today (θ = Σ_k w_k·T_k(θ_k), :mod:`mergescope.studies.plan`:
:attr:`~mergescope.merge.methods.MergeMethod.plan_ready`); the registry's other methods (a combine step:
aggregation over a shared base, soups, Fisher, RegMean, ensembles; or inputs the plan does not give: the learned
permutations ``ste``) and the compositions ``alignment>aggregation`` run through
:meth:`~mergescope.merge.methods.MergeMethod.merge` and are in :data:`COMBINED` (:func:`resolve_method` checks any
method string; :func:`batchnorm_of` says how it treats BatchNorm statistics).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from ..align.covariance import JointMoments
from ..errors import MergescopeError
from ..perm import PermSpec
from .maps import ChannelMap
from .methods import MergeMethod, StatsMaps, get_fix, get_merge_method, list_fixes, list_merge_methods, stats_places

Stats = Mapping[str, JointMoments]  # group -> joint statistics of one model with the reference


@dataclass(frozen=True)
class MapMethod:
    """A map-based base: where its joint statistics are gathered and how one model's maps are made from them."""

    at: str  # "observe" or "preactivation" (mergescope.align.covariance.group_points)
    maps: Callable[[Stats], dict[str, ChannelMap]]  # statistics at ``at`` -> maps into the reference's space
    about: str  # the paper and how this variant reads it

    def __call__(self, stats_at: Mapping[str, Stats]) -> dict[str, ChannelMap]:
        """One model's maps from its statistics by place (``{place: {group: JointMoments}}``)."""
        return self.maps(stats_at[self.at])


def _map_method(name: str) -> MapMethod:
    method = get_merge_method(name)
    return MapMethod(method.align.place, functools.partial(method.align.fit, **method.defaults()), method.about)


# the registry's methods that map each model from its own statistics with the reference, at their defaults
MAP_METHODS = {n: _map_method(n) for n in list_merge_methods() if isinstance(get_merge_method(n).align, StatsMaps)}
BASES = tuple(n for n in list_merge_methods() if get_merge_method(n).plan_ready)
COMBINED = tuple(n for n in list_merge_methods() if not get_merge_method(n).plan_ready)
FIXES = ("", *("+" + f for f in list_fixes()))
REPAIR_FIXES = {f: get_fix(f).repair_points for f in list_fixes() if get_fix(f).repair_points}  # -> RepairTarget.points
ALL_METHODS = tuple(base + fix for base in BASES for fix in FIXES)


def map_places(bases: Iterable[str]) -> tuple[str, ...]:
    """The places (:data:`mergescope.align.covariance.PLACES`) whose statistics these bases need (ZipIt!: the
    observation points; bases without joint statistics: none)."""
    return stats_places(bases)


def corrections(spec: PermSpec, methods: Sequence[str]) -> dict[str, str]:
    """Method -> which points of this architecture its fix corrects (``+repair``, ``+repair_preact``, ``+reset``)."""
    out = {}
    for method in methods:
        fix = split_method(method)[1]
        out[method] = get_fix(fix).describe(spec) if fix else "nothing"
    return out

def batchnorm_of(method: str) -> str:
    """How ``base+fix`` treats BatchNorm running statistics (:data:`mergescope.merge.methods.BATCHNORM`): the
    fix's (``+repair*``: "repair", ``+reset``: "reset"), else the base's."""
    base, fix = split_method(method)
    if fix:
        return "reset" if get_fix(fix).repair_points is None else "repair"
    return get_merge_method(base).batchnorm


def resolve_method(method: str) -> tuple[MergeMethod, str]:
    """Any method string — a registered base, a composition ``alignment>aggregation``, either with ``+fix`` — as
    its registry entry and its fix (``""``: none); an unknown part is a one-line error naming it. (What a command
    that runs :meth:`MergeMethod.merge` validates with; the merge plan accepts :data:`ALL_METHODS` only.)"""
    base, fix = split_method(method)
    if fix:
        get_fix(fix)
    return get_merge_method(base), fix


def split_method(method: str) -> tuple[str, str]:
    """``"cca+repair"`` -> ``("cca", "repair")``; ``"permuted"`` -> ``("permuted", "")``."""
    base, _, fix = method.partition("+")
    return base, fix


def check_methods(methods: Iterable[str], allowed: Iterable[str] = ALL_METHODS) -> list[str]:
    """The methods, in order and without repeats; a one-line error names the first unknown one."""
    methods, allowed = list(dict.fromkeys(methods)), tuple(allowed)
    unknown = [m for m in methods if m not in allowed]
    if unknown:
        raise MergescopeError(f"unknown merge method '{unknown[0]}'; known: {', '.join(allowed)}")
    return methods


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``+reset`` means anything for this model."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
