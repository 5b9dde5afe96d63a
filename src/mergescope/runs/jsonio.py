"""JSON for run folders and sidecars: common scientific types converted, written atomically."""
from __future__ import annotations

import dataclasses
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_write_text


def package_version(name: str = "mergescope") -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def json_default(obj: Any) -> Any:
    """Make common non-JSON values (dataclasses, numpy, paths, torch scalars/devices/dtypes) serialisable."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"a {type(obj).__name__} is not JSON-serialisable")


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=json_default, indent=2) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path``, atomically."""
    return atomic_write_text(path, dumps(obj))
