"""Merging: interpolation along α, REPAIR and RESET, metric-guided partial merging, and merging with maps
(CCA, OT fusion, regression, ZipIt!) instead of permutations."""
from .cca import cca_map, cca_maps, cca_merge_many
from .interpolate import alpha_grid, interpolate_model, interpolate_state
from .maps import (ChannelMap, MapLayout, MapMergeResult, MethodInfo, combine_states, map_layout, map_model,
                   merge_models_with_maps, merge_with_maps, permutation_index, permutation_maps)
from .ot import activation_cost, ot_map, ot_maps, ot_merge_many, sinkhorn
from .partial import (group_scores, partial_merge_curves, partial_merge_model, partial_merge_state,
                      select_channels)
from .partial_zip import partial_zip_model
from .regression_merge import regression_map, regression_maps, regression_merge_many
from .repair import (REPAIR_POINTS, RepairTarget, describe_repair, extra_layers, repair_and_reset, repair_many,
                     repair_plan)
from .zipit import zip_features, zipit_maps, zipit_merge

__all__ = [
    "ChannelMap", "MapLayout", "MapMergeResult", "MethodInfo", "activation_cost", "alpha_grid", "cca_map",
    "cca_maps", "cca_merge_many", "combine_states", "group_scores", "interpolate_model", "interpolate_state",
    "map_layout", "map_model", "merge_models_with_maps", "merge_with_maps", "ot_map", "ot_maps", "ot_merge_many",
    "partial_merge_curves", "partial_merge_model", "partial_merge_state", "partial_zip_model", "permutation_index", "permutation_maps",
    "REPAIR_POINTS", "RepairTarget", "describe_repair", "extra_layers", "regression_map", "regression_maps",
    "regression_merge_many", "repair_and_reset", "repair_many", "repair_plan", "select_channels",
    "sinkhorn", "zip_features", "zipit_maps", "zipit_merge",
]
