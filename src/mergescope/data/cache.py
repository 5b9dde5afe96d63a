"""A content-keyed on-disk cache of decoded arrays (.npy), written atomically."""

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mergescope.runs.atomic import atomic_path


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def cached_array(cache_dir: str | os.PathLike | None, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``compute()``, or its earlier result stored as ``cache_dir/<key>.npy``.

    A missing or unreadable cache file is recomputed and rewritten via a temporary file and
    ``os.replace``, so concurrent readers never see a partial file. ``cache_dir=None`` disables caching.
    """
    if cache_dir is None:
        return compute()
    cache_dir = Path(cache_dir)
    target = cache_dir / f"{key}.npy"
    if target.is_file():
        try:
            return np.load(target, allow_pickle=False)
        except (OSError, ValueError):
            pass  # corrupt or truncated by someone else: recompute below
    array = compute()
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    return array
