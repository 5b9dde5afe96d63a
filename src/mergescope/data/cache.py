"""Decoded arrays kept once: a content-keyed on-disk cache (.npy, written atomically) and an in-process one."""

import hashlib
import os
import weakref
from collections.abc import Callable, Sequence
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


_decoded: "weakref.WeakValueDictionary[str, np.ndarray]" = weakref.WeakValueDictionary()


def decoded_once(key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``compute()``, or the array an earlier call with ``key`` returned while that array is still alive (a
    dataset opened twice in one process — e.g. by two stages of a study — is decoded once, and freed with its
    last user)."""
    array = _decoded.get(key)
    if array is None:
        array = compute()
        _decoded[key] = array
    return array


def files_key(paths: Sequence[str], *extra: object) -> str:
    """A key that changes when any file is replaced, resized or touched: sha256 over path, size and mtime."""
    h = hashlib.sha256(repr(extra).encode())
    for path in paths:
        st = os.stat(path)
        h.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
