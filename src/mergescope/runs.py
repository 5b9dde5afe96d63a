"""Runs are folders: a manifest (config, versions, seeds, hashes), checkpoints, results, figures, a report.

Nothing is silently overwritten: a run folder that already holds a manifest is refused unless the caller
asks to overwrite it.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._jsonio import package_version, write_json
from .data.cache import file_sha256
from .errors import MergescopeError

MANIFEST = "manifest.json"


def prepare_run_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Create the run folder; refuse one that already holds a finished run unless ``overwrite``."""
    path = Path(path)
    if (path / MANIFEST).exists() and not overwrite:
        raise MergescopeError(f"{path} already holds a run (manifest.json); pass --overwrite or choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def environment() -> dict[str, str]:
    """Versions of everything that can change a number."""
    import torchvision

    return {
        "mergescope": package_version(), "python": sys.version.split()[0], "torch": torch.__version__,
        "torchvision": torchvision.__version__, "numpy": np.__version__, "platform": platform.platform(),
        "threads": str(torch.get_num_threads()),
    }


def write_manifest(run_dir: Path, config: dict[str, Any], files: Iterable[str | os.PathLike] = (),
                   **extra: Any) -> Path:
    """Write ``manifest.json`` last, so its presence means the run finished.

    Args:
        config: the resolved configuration of the run (seeds included).
        files: files of the run to fingerprint (sha256), relative to ``run_dir`` in the manifest.
        extra: further JSON-able entries (dataset fingerprints, timings...).
    """
    hashes = {str(Path(f).resolve().relative_to(run_dir.resolve())): file_sha256(f) for f in files}
    record = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
              "config": config, "environment": environment(), "sha256": hashes, **extra}
    return write_json(run_dir / MANIFEST, record)
