"""mergescope: align independently trained networks by permutation, merge them, and look inside the result.

The stages of the data flow live in subpackages — ``data``, ``models``, ``train``, ``perm``, ``align``,
``merge``, ``probe``, ``evaluate``, ``compare``, ``embed``, ``report``, with run folders and file I/O in
``runs`` and the command line in ``cli`` — and the studies that compose them, one
module per command, in ``studies`` (``sweep``, ``merge``, ``probe``, ``compare``, ``regress``, ``demo``; each a
``Config``, ``run`` in memory and ``run_folder``). The most used entry points are re-exported here.

They are imported on first use, so ``import mergescope`` does not import torch: the command line
(:mod:`mergescope.cli`) sets torch's OpenMP environment before torch is loaded.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what __getattr__ provides, for type checkers and IDEs
    from .align import activation_matching, match_many, weight_matching
    from .errors import (
        ArchitectureError,
        CheckpointError,
        DatasetError,
        MergescopeError,
        NumericsError,
    )
    from .merge import interpolate_model, repair_and_reset
    from .perm import build_spec, list_layers, permute_model
    from .probe import load_probe
    from .studies.sweep import SweepConfig
    from .studies.sweep import run as run_sweep

    __version__: str

__all__ = [
    "ArchitectureError", "CheckpointError", "DatasetError", "MergescopeError", "NumericsError", "SweepConfig",
    "activation_matching", "build_spec", "interpolate_model", "list_layers", "load_probe", "match_many",
    "permute_model", "repair_and_reset", "run_sweep", "weight_matching",
]
_EXPORTS = {  # submodule -> the names re-exported from it
    "errors": ("ArchitectureError", "CheckpointError", "DatasetError", "MergescopeError", "NumericsError"),
    "align": ("activation_matching", "match_many", "weight_matching"),
    "merge": ("interpolate_model", "repair_and_reset"),
    "perm": ("build_spec", "list_layers", "permute_model"),
    "probe": ("load_probe",),
    "studies.sweep": ("SweepConfig",),
}
_SOURCE = {name: (module, name) for module, names in _EXPORTS.items() for name in names}
_SOURCE["run_sweep"] = ("studies.sweep", "run")


def __getattr__(name: str) -> Any:
    """Import a re-exported name, ``__version__`` or a subpackage on first access."""
    if name in _SOURCE:
        module, attr = _SOURCE[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
    elif name == "__version__":
        from .runs.jsonio import package_version

        value = package_version()
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise  # the submodule exists but a dependency of it is missing
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value

