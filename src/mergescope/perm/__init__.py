"""Permutation symmetry: the spec derived from a model's graph, and applying permutations."""
from .apply import (Perms, apply_permutation, identity_perms, invert, layer_orders, permute_axis, permute_model,
                    random_perms)
from .layers import LAYER_SELECTIONS, select_layers
from .spec import (MATCH_POINTS, PermAxis, PermGroup, PermSpec, RepairPoint, TapPoint, build_spec,
                   default_example_input, list_layers, observation_points)

__all__ = [
    "LAYER_SELECTIONS", "MATCH_POINTS", "PermAxis", "PermGroup", "PermSpec", "Perms", "RepairPoint", "TapPoint",
    "apply_permutation", "build_spec", "default_example_input", "identity_perms", "invert", "layer_orders",
    "list_layers", "observation_points", "permute_axis", "permute_model", "random_perms", "select_layers",
]
