"""Merge methods by name, as the studies (:mod:`mergescope.sweep`, :mod:`mergescope.many`) and the CLI spell them.

A method is a *base* — how the models are put into one channel space — optionally followed by a *fix*:

* bases: ``naive`` (no alignment), ``permuted`` (activation or weight matching onto the reference),
  ``mergemany`` (Git Re-Basin's MergeMany: every model weight-matched onto the average of the others), and the
  map-based ``cca``, ``ot``, ``regression`` (a per-group linear map fitted on joint feature statistics; each
  default as its reference, with named variants ``cca_relative`` and ``ot_sinkhorn``, :data:`MAP_METHODS`) and
  ``zipit`` (feature zipping, also within one model; two models at a time);
* fixes: ``+repair`` (REPAIR towards the mapped endpoints' channel statistics, :func:`repair_many`, at the
  points REPAIR's reference corrects: on a residual net every block output through an added layer, and every
  BatchNorm reset), ``+repair_preact`` (REPAIR of the pre-activation outputs only, fused: the original
  architecture; the same as ``+repair`` on non-residual nets) or ``+reset`` (BatchNorm statistics recomputed;
  models with BatchNorm only).

E.g. ``permuted+repair`` is REPAIR's method, ``cca+repair`` CCA merging followed by REPAIR.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from ..align.covariance import PLACES, JointMoments
from ..errors import MergescopeError
from ..perm import PermSpec
from .cca import cca_maps
from .maps import ChannelMap
from .ot import ot_maps
from .regression_merge import regression_maps
from .repair import describe_repair

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


MAP_METHODS = {
    "cca": MapMethod("observe", lambda st: cca_maps(st)[0],
                     "CCA merging (Horoi et al. 2024) as its reference: 0.1·I added to each covariance"),
    "cca_relative": MapMethod("observe", lambda st: cca_maps(st, relative=True)[0],
                              "CCA merging with a relative ridge: 0.1 × each side's mean variance"),
    "ot": MapMethod("preactivation", lambda st: ot_maps(st)[0],
                    "OT fusion (Singh & Jaggi 2020) as its reference: exact OT, Euclidean distance of "
                    "pre-activations; a residual stream's is its stage end's sum before the ReLU, one plan per "
                    "group where the reference averages per-conv maps across skips"),
    "ot_sinkhorn": MapMethod("observe", lambda st: ot_maps(st, reg=0.01, cost="correlation")[0],
                             "OT fusion with 1 − correlation of post-activations and Sinkhorn "
                             "(ε = 0.01 × mean cost)"),
    "regression": MapMethod("observe", lambda st: regression_maps(st)[0],
                            "regression merging: each group's least-squares map of A's features on B's, ridge "
                            "0.1·(1 − R²) per channel (vanishes on an exact fit)"),
    "regression_ols": MapMethod("observe", lambda st: regression_maps(st, ridge=0.0)[0],
                                "regression merging with plain least squares (no ridge): large weights on rarely "
                                "firing B channels flood nets without BatchNorm"),
}
BASES = ("naive", "permuted", "mergemany", *MAP_METHODS, "zipit")
FIXES = ("", "+repair", "+repair_preact", "+reset")
REPAIR_FIXES = {"repair": "reference", "repair_preact": "preact"}  # fix -> RepairTarget.points
ALL_METHODS = tuple(base + fix for base in BASES for fix in FIXES)


def map_places(bases: Iterable[str]) -> tuple[str, ...]:
    """The places (:data:`mergescope.align.covariance.PLACES`) whose statistics these bases need (ZipIt!: the
    observation points; bases without joint statistics: none)."""
    wanted = {MAP_METHODS[b].at if b in MAP_METHODS else "observe" for b in bases if b in MAP_METHODS or b == "zipit"}
    return tuple(p for p in PLACES if p in wanted)


def corrections(spec: PermSpec, methods: Sequence[str]) -> dict[str, str]:
    """Method -> which points of this architecture its fix corrects (``+repair``, ``+repair_preact``, ``+reset``)."""
    out = {}
    for method in methods:
        fix = split_method(method)[1]
        out[method] = (describe_repair(spec, REPAIR_FIXES[fix]) if fix in REPAIR_FIXES
                       else "every BatchNorm's statistics recomputed" if fix == "reset" else "nothing")
    return out


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
