"""Merge methods by name, as the studies (:mod:`mergescope.sweep`, :mod:`mergescope.many`) and the CLI spell them.

A method is a *base* — how the models are put into one channel space — optionally followed by a *fix*:

* bases: ``naive`` (no alignment), ``permuted`` (activation or weight matching onto the reference),
  ``mergemany`` (Git Re-Basin's MergeMany: every model weight-matched onto the average of the others), and the
  map-based ``cca``, ``ot``, ``regression`` (a per-group linear map fitted on joint feature statistics) and
  ``zipit`` (feature zipping, also within one model; two models at a time);
* fixes: ``+repair`` (REPAIR towards the mapped endpoints' channel statistics, :func:`repair_many`) or
  ``+reset`` (BatchNorm statistics recomputed; models with BatchNorm only).

E.g. ``permuted+repair`` is REPAIR's method, ``cca+repair`` CCA merging followed by REPAIR.
"""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..errors import MergescopeError
from .cca import cca_maps
from .ot import ot_maps
from .regression_merge import regression_maps

# base -> (joint statistics of one model with the reference -> that model's maps into the reference's space)
MAP_METHODS = {
    "cca": lambda stats: cca_maps(stats)[0],
    "ot": lambda stats: ot_maps(stats)[0],
    "regression": lambda stats: regression_maps(stats)[0],
}
BASES = ("naive", "permuted", "mergemany", *MAP_METHODS, "zipit")
FIXES = ("", "+repair", "+reset")
ALL_METHODS = tuple(base + fix for base in BASES for fix in FIXES)


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
