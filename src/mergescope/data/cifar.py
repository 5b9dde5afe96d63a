"""CIFAR-10 from torchvision's own files, and our JPEG pack format (.npz), as in-memory datasets."""

import os
from functools import partial
from pathlib import Path

import numpy as np
import torch

from mergescope.data.cache import cached_array, decoded_once, file_sha256, files_key
from mergescope.data.decode import decode_jpeg_chunk
from mergescope.data.memory import InMemoryDataset
from mergescope.data.normalize import CIFAR10_MEAN, CIFAR10_STD, HALF_MEAN, HALF_STD
from mergescope.data.loader import default_workers
from mergescope.data.pool import chunk_bounds, parallel_starmap
from mergescope.errors import DatasetError

PACK_KEYS = ("data", "offsets", "labels", "classes")
KNOWN_STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD)}
SPLIT_SUFFIXES = ("_train", "_test", "_val")


def load_cifar10(root: str | os.PathLike, split: str = "train", download: bool = False) -> InMemoryDataset:
    """CIFAR-10 in torchvision's format (``root/cifar-10-batches-py``), with the standard mean/std.

    Args:
        root: folder holding (or to receive) ``cifar-10-batches-py``.
        split: "train" (50,000) or "test" (10,000).
        download: fetch the archive into ``root`` if it is missing.

    Returns:
        InMemoryDataset named "cifar10", 3×32×32.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"cifar10 has splits train/test, not {split!r}")
    root = Path(root).expanduser()
    if not download and not root.is_dir():
        raise DatasetError(f"dataset path not found: {root}")
    from torchvision.datasets import CIFAR10  # only this loader needs it

    try:
        raw = CIFAR10(str(root), train=split == "train", download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise DatasetError(f"CIFAR-10 not found or corrupt in {root / CIFAR10.base_folder} "
                           f"(pass download=True to fetch it)") from exc
    return InMemoryDataset(raw.data, raw.targets, raw.classes, CIFAR10_MEAN, CIFAR10_STD, name="cifar10")


def _read_pack(path: Path) -> dict[str, np.ndarray]:
    """The four arrays of a pack, checked for consistency."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in PACK_KEYS if k not in z.files]
            if missing:
                raise DatasetError(f"{path} is not a JPEG pack: missing {', '.join(missing)}")
            pack = {k: z[k] for k in PACK_KEYS}
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read JPEG pack {path}: {exc}") from exc
    offsets, n = pack["offsets"], len(pack["labels"])
    if (pack["data"].dtype != np.uint8 or len(offsets) != n + 1 or offsets[0] != 0
            or offsets[-1] != len(pack["data"]) or np.any(np.diff(offsets) <= 0)):
        raise DatasetError(f"{path}: inconsistent JPEG pack (data/offsets/labels don't match)")
    return pack


def decode_pack(data: np.ndarray, offsets: np.ndarray, workers: int | None = None) -> np.ndarray:
    """Decode every image of a pack with Pillow, in chunks over a process pool.

    Args:
        data: uint8 [total_bytes]; offsets: int64 [n+1].
        workers: processes (default: the process's setting, one per CPU unless --workers says otherwise;
            ≤ 1 decodes in this process).

    Returns:
        uint8 [n, H, W, 3].
    """
    workers = default_workers() if workers is None else workers
    size = decode_jpeg_chunk(data[:offsets[1]].tobytes(), offsets[:2]).shape[1:3]  # all must match image 0
    bounds = chunk_bounds(len(offsets) - 1, 4 * max(workers, 1))
    tasks = [(data[offsets[a]:offsets[b]].tobytes(), offsets[a:b + 1] - offsets[a], a, size) for a, b in bounds]
    return np.concatenate(parallel_starmap(decode_jpeg_chunk, tasks, workers))  # [n,H,W,3]


def pack_name(path: Path) -> str:
    """Dataset name from a pack's file name: ``cifar10_test.npz`` → ``cifar10``."""
    stem = path.stem
    for suffix in SPLIT_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def load_jpeg_pack(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                   mean=None, std=None, workers: int | None = None) -> InMemoryDataset:
    """A JPEG pack (.npz: ``data``, ``offsets``, ``labels``, ``classes``), decoded into memory.

    Args:
        path: the .npz file; image i is ``data[offsets[i]:offsets[i+1]]``.
        cache_dir: if given, the decoded uint8 array is cached there as ``<sha256 of pack>.npy``; if not, a pack
            opened again while the pixels of its last opening are still in use reuses them.
        mean, std: per-channel normalization; default: the standard statistics for a known name
            (``cifar10*`` packs), else 0.5.
        workers: decoding processes (default: the process's setting, :func:`mergescope.data.set_workers`).

    Returns:
        InMemoryDataset, RGB, named after the file (``cifar10_train.npz`` → "cifar10").
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"dataset path not found: {path}")
    pack = _read_pack(path)
    name = pack_name(path)
    key = file_sha256(path) if cache_dir is not None else ""
    decode = partial(decode_pack, pack["data"], pack["offsets"], workers)
    if cache_dir is None:  # opened again in this process while still in use: decoded once
        pixels = decoded_once(files_key([str(path.resolve())], "jpeg pack"), decode)
    else:
        pixels = cached_array(cache_dir, key, decode)
    if pixels.shape[0] != len(pack["labels"]):
        raise DatasetError(f"cached pixels for {path} hold {pixels.shape[0]} images, pack has {len(pack['labels'])}")
    default_mean, default_std = KNOWN_STATS.get(name, (HALF_MEAN, HALF_STD))
    return InMemoryDataset(torch.from_numpy(pixels), pack["labels"], [str(c) for c in pack["classes"]],
                           default_mean if mean is None else mean, default_std if std is None else std, name=name)
