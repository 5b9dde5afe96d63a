"""Run folders and the file I/O every stage shares, in one place: atomic writes (:mod:`.atomic`), JSON
(:mod:`.jsonio`), the one CSV writer (:mod:`.csvio`) and the folder itself — its manifest (config, versions,
seeds, sha256 of every file), results and report (:mod:`.folder`).

The folder's names are imported on first use, so the light writers load without torch (and without a cycle:
:mod:`mergescope.data` writes through :mod:`.atomic`).
"""
from __future__ import annotations

import importlib
from typing import Any

_FOLDER = ("MANIFEST", "RESULTS", "add_to_run", "environment", "file_hashes", "load_run", "prepare_run_dir",
           "refresh_hashes", "run_arch", "run_checkpoints", "verify_files", "write_manifest")
__all__ = list(_FOLDER)


def __getattr__(name: str) -> Any:
    if name in _FOLDER:
        return getattr(importlib.import_module(".folder", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
