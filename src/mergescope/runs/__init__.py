"""Run folders and the file I/O every stage shares, in one place: atomic writes (:mod:`.atomic`), JSON
(:mod:`.jsonio`), the one CSV writer (:mod:`.csvio`) and the folder itself — its manifest (config, versions,
seeds, sha256 of every file), results and report (:mod:`.folder`) — and how a command writes it: as a whole, in a
staging folder put in place by one rename, under a lock (:mod:`.transaction`).

The folder's names are imported on first use, so the light writers load without torch (and without a cycle:
:mod:`mergescope.data` writes through :mod:`.atomic`).
"""
from __future__ import annotations

import importlib
from typing import Any

_FOLDER = ("MANIFEST", "RESULTS", "add_to_run", "environment", "file_hashes", "load_run", "refresh_hashes",
           "run_arch", "run_checkpoints", "verify_files", "verify_inputs", "write_manifest")
_TRANSACTION = ("RunLock", "Staging", "describe_os_error", "write_run")
__all__ = [*_FOLDER, *_TRANSACTION]


def __getattr__(name: str) -> Any:
    if name in _FOLDER:
        return getattr(importlib.import_module(".folder", __name__), name)
    if name in _TRANSACTION:
        return getattr(importlib.import_module(".transaction", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
