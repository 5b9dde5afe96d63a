"""mergescope: align independently trained networks by permutation, merge them, and look inside the result.

The stages of the data flow live in subpackages — ``data``, ``models``, ``train``, ``perm``, ``align``,
``merge``, ``probe``, ``evaluate``, ``compare``, ``embed``, ``report`` — and the studies that compose them in
``sweep`` (interpolation), ``features`` (top-k images of aligned models) and ``comparison`` (channel metrics).
The most used entry points are re-exported here.
"""
from ._jsonio import package_version
from .align import activation_matching, match_many, weight_matching
from .errors import ArchitectureError, CheckpointError, DatasetError, MergescopeError, NumericsError
from .merge import interpolate_model, repair_and_reset
from .perm import build_spec, list_layers, permute_model
from .probe import load_probe
from .sweep import SweepConfig, run_sweep

__version__ = package_version()

__all__ = [
    "ArchitectureError", "CheckpointError", "DatasetError", "MergescopeError", "NumericsError", "SweepConfig",
    "activation_matching", "build_spec", "interpolate_model", "list_layers", "load_probe", "match_many",
    "permute_model", "repair_and_reset", "run_sweep", "weight_matching",
]
