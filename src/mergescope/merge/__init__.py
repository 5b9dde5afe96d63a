"""Merging: interpolation along α, REPAIR and RESET, metric-guided partial merging, merging with maps
(CCA, OT fusion, regression, ZipIt!) instead of permutations, weight aggregation (averages and soups, task vectors
over a shared base, Fisher and RegMean weightings), ensembles, learned permutations (Git Re-Basin's
straight-through estimator), and the registry of merge methods
(:mod:`mergescope.merge.methods`).

Names are imported on first use, so ``mergescope.merge.methods`` (the registry the command line's help is built
from) can be imported without torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what __getattr__ provides, for type checkers and IDEs
    from .aggregate import fedavg_weights, recompute_batchnorm, weighted_average
    from .cca import cca_map, cca_maps
    from .ensemble import Ensemble, inference_cost
    from .fisher import diagonal_fisher, fisher_average
    from .interpolate import alpha_grid, interpolate_model, interpolate_state
    from .maps import (ChannelMap, MapLayout, MapMergeResult, combine_states, map_layout, map_model,
                       merge_models_with_maps, merge_with_maps, permutation_index, permutation_maps)
    from .methods import (BATCHNORM, FAMILIES, NEEDS, AlignInputs, Fix, HyperParam, MergeMethod, StatsMaps, get_fix,
                          get_merge_method, list_fixes, list_merge_methods, methods_help, methods_table,
                          register_merge_method, stats_places)
    from .ot import activation_cost, ot_map, ot_maps, sinkhorn
    from .partial import (group_scores, partial_merge_curves, partial_merge_model, partial_merge_state,
                          select_channels)
    from .partial_zip import partial_zip_model
    from .regmean import input_grams, regmean_state
    from .regression_merge import regression_map, regression_maps
    from .repair import (REPAIR_POINTS, RepairTarget, describe_repair, extra_layers, repair_and_reset,
                         repair_many, repair_plan)
    from .soups import greedy_soup, heldout_accuracy
    from .ste import straight_through_matching
    from .task_vectors import apply_task_vector, breadcrumbs_mask, dare, ties_vector
    from .zipit import zip_features, zipit_maps, zipit_merge

_EXPORTS = {  # submodule -> the names re-exported from it
    "aggregate": ("fedavg_weights", "recompute_batchnorm", "weighted_average"),
    "cca": ("cca_map", "cca_maps"),
    "ensemble": ("Ensemble", "inference_cost"),
    "fisher": ("diagonal_fisher", "fisher_average"),
    "interpolate": ("alpha_grid", "interpolate_model", "interpolate_state"),
    "maps": ("ChannelMap", "MapLayout", "MapMergeResult", "combine_states", "map_layout", "map_model",
             "merge_models_with_maps", "merge_with_maps", "permutation_index", "permutation_maps"),
    "methods": ("BATCHNORM", "FAMILIES", "NEEDS", "AlignInputs", "Fix", "HyperParam", "MergeMethod", "StatsMaps",
                "get_fix", "get_merge_method", "list_fixes", "list_merge_methods", "methods_help", "methods_table",
                "register_merge_method", "stats_places"),
    "ot": ("activation_cost", "ot_map", "ot_maps", "sinkhorn"),
    "partial": ("group_scores", "partial_merge_curves", "partial_merge_model", "partial_merge_state",
                "select_channels"),
    "partial_zip": ("partial_zip_model",),
    "regmean": ("input_grams", "regmean_state"),
    "regression_merge": ("regression_map", "regression_maps"),
    "repair": ("REPAIR_POINTS", "RepairTarget", "describe_repair", "extra_layers", "repair_and_reset", "repair_many",
               "repair_plan"),
    "soups": ("greedy_soup", "heldout_accuracy"),
    "ste": ("straight_through_matching",),
    "task_vectors": ("apply_task_vector", "breadcrumbs_mask", "dare", "ties_vector"),
    "zipit": ("zip_features", "zipit_maps", "zipit_merge"),
}
_SOURCE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_SOURCE)


def __getattr__(name: str) -> Any:
    """Import a re-exported name or a submodule on first access."""
    if name in _SOURCE:
        value = getattr(importlib.import_module(f".{_SOURCE[name]}", __name__), name)
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value
