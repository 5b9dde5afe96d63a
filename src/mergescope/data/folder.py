"""ImageFolder trees (``root/<class>/<file>``, images of any size and mode) as an ImageDataset."""

import hashlib
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.transforms import functional as TF

from mergescope.data.base import ImageDataset, as_ids
from mergescope.data.decode import (IMAGENET_CROP, IMAGENET_RESIZE, decode_files, image_size, image_sizes,
                                    load_rgb, size_mismatch)
from mergescope.data.device_decode import decode_batch
from mergescope.data.memory import InMemoryDataset
from mergescope.data.normalize import (HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD, normalize_chw,
                                      normalize_uint8)
from mergescope.data.cache import decoded_once, files_key
from mergescope.data.loader import default_workers
from mergescope.data.pool import chunk_bounds, parallel_starmap
from mergescope.errors import DatasetError

PRESETS = ("auto", "small", "imagenet")
SMALL_MAX_SIDE = 64  # "auto" picks "small" when the first image's long side is at most this
IN_MEMORY_LIMIT = 200_000  # "small" trees with fewer images are decoded into memory by default
SPLIT_DIRS = ("train", "test", "val")


def imagenet_geometry(img: Image.Image) -> Image.Image:
    """Resize the short side to 256 then center-crop 224×224 (the usual ImageNet evaluation view)."""
    return TF.center_crop(TF.resize(img, IMAGENET_RESIZE), [IMAGENET_CROP, IMAGENET_CROP])


def resolve_preset(preset: str, first_path: str) -> str:
    """"small" or "imagenet"; "auto" decides from the first image's long side."""
    if preset not in PRESETS:
        raise DatasetError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    if preset != "auto":
        return preset
    return "small" if max(image_size(first_path)) <= SMALL_MAX_SIDE else "imagenet"


def _chunked(fn, paths: list[str], workers: int | None, **kw) -> list:
    """Run ``fn(paths[a:b], **kw)`` over contiguous chunks in a process pool, results in order."""
    workers = default_workers() if workers is None else workers
    bounds = chunk_bounds(len(paths), 4 * max(workers, 1))
    return parallel_starmap(partial(fn, **kw), [(paths[a:b],) for a, b in bounds], workers)


def check_common_size(paths: list[str], size: tuple[int, int], workers: int | None = None) -> None:
    """Read every header; DatasetError naming the first file whose (height, width) isn't ``size``."""
    sizes = np.concatenate(_chunked(image_sizes, paths, workers))  # [n,2]
    bad = np.flatnonzero(np.any(sizes != np.asarray(size), axis=1))
    if bad.size:
        raise size_mismatch(paths[bad[0]], tuple(sizes[bad[0]]), size)


class ImageFolderDataset(ImageDataset):
    """torchvision's ImageFolder layout (classes sorted, files sorted within a class), converted to RGB.

    Presets: "small" keeps the size (all images must share it) and normalizes with 0.5 mean/std;
    "imagenet" resizes to 256, center-crops 224 and uses ImageNet mean/std; "auto" picks "small" when
    the first image is at most 64 px on its long side.

    Fingerprint: sha256 over one line per image, ``<path relative to root, posix>\\t<file size>\\t<mtime in
    ns>\\t<label>``, in id order — an image edited in place changes it — and, when the tree is decoded into memory
    anyway, over the decoded pixels too (so a content change that keeps size and mtime is seen as well). Preset and
    normalization are not part of it.
    """

    def __init__(self, root: str | os.PathLike, preset: str = "auto", in_memory: bool | None = None,
                 mean=None, std=None, name: str | None = None, workers: int | None = None):
        """
        Args:
            root: folder with one sub-folder of images per class.
            preset: "auto", "small" or "imagenet".
            in_memory: decode everything once into memory (default: True for "small" trees below 200k images).
            mean, std: override the preset's normalization (3 values each).
            name: dataset name (default: the folder's name, or its parent's for train/test/val folders).
            workers: decoding processes (default: the process's setting, one per CPU unless --workers says
                otherwise).
        """
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetError(f"dataset path not found: {root}")
        try:
            folder = ImageFolder(str(root))
        except FileNotFoundError as exc:
            raise DatasetError(f"no class folders with images in {root}") from exc
        self.root = root
        self.paths = [path for path, _ in folder.samples]
        self.targets = np.asarray(folder.targets, dtype=np.int64)
        self.classes = list(folder.classes)
        self.name = name or (root.parent.name if root.name in SPLIT_DIRS else root.name)
        self.preset = resolve_preset(preset, self.paths[0])
        imagenet = self.preset == "imagenet"
        self._geometry = imagenet_geometry if imagenet else None
        default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet else (HALF_MEAN, HALF_STD)
        self.mean = tuple(default_mean if mean is None else mean)
        self.std = tuple(default_std if std is None else std)
        self.num_channels = 3
        self.image_size = image_size(self.paths[0]) if self.preset == "small" else (IMAGENET_CROP, IMAGENET_CROP)
        if in_memory is None:
            in_memory = self.preset == "small" and len(self.paths) < IN_MEMORY_LIMIT
        self.in_memory = bool(in_memory)
        self._memory = None
        try:
            if self.in_memory:  # decoding checks every size itself; a tree opened again is decoded once
                pixels = decoded_once(files_key(self.paths, self.preset, self.image_size), lambda: np.concatenate(
                    _chunked(decode_files, self.paths, workers, geometry=self._geometry, size=self.image_size)))
                self._memory = InMemoryDataset(torch.from_numpy(pixels), self.targets, self.classes,
                                               self.mean, self.std, name=self.name)  # pixels [N,H,W,3]
            elif self.preset == "small":
                check_common_size(self.paths, self.image_size, workers)
        except DatasetError as e:
            if self.preset != "small" or "share one size" not in str(e):
                raise
            why = " (chosen because it is at most 64 px)" if preset == "auto" else ""
            raise DatasetError(f"{e}: the first image, {self.paths[0]}, sets the size{why}, and a tree of small "
                               "images is read at that size, so every image must have it; if that file is the odd one, "
                               "remove or replace it") from None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._memory is not None:
            return self._memory[i]
        pixels = decode_files([self.paths[i]], self._geometry, self.image_size)  # [1,H,W,3]
        return normalize_uint8(pixels, self.mean, self.std)[0], int(self.targets[i])

    def get_batch(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        if self._memory is not None:
            return self._memory.get_batch(ids)
        pixels, y = self.pixel_batch(as_ids(ids, len(self)))
        return normalize_uint8(pixels, self.mean, self.std), torch.from_numpy(y)

    def pixel_batch(self, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Decoded uint8 [B, H, W, 3] pixels and int64 [B] labels of ``ids`` (for loader workers)."""
        idx = ids.tolist()
        if not idx:
            return np.empty((0, *self.image_size, 3), np.uint8), self.targets[:0]
        pixels = decode_files([self.paths[i] for i in idx], self._geometry, self.image_size)
        return pixels, self.targets[idx]

    def file_batch(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """The files of ``ids`` as they are on disk, for loader workers when the batch is decoded on the pass's device
        (:meth:`device_batch`): their bytes one after the other (uint8, one tensor: one transfer between processes
        instead of one per file), int64 [B] lengths, and int64 [B] labels."""
        idx = ids.tolist()
        parts = []
        for i in idx:
            try:
                parts.append(np.fromfile(self.paths[i], dtype=np.uint8))
            except OSError as exc:
                raise DatasetError(f"cannot read image {self.paths[i]}: {exc}") from exc
        data = np.concatenate(parts) if parts else np.empty(0, np.uint8)
        return torch.from_numpy(data), torch.tensor([len(q) for q in parts], dtype=torch.int64), self.targets[idx]

    def device_batch(self, ids: torch.Tensor, data: torch.Tensor, lengths: torch.Tensor,
                     device: torch.device | str) -> torch.Tensor:
        """float32 [B, 3, H, W] on ``device``, normalized, of :meth:`file_batch`'s bytes, decoded there
        (:mod:`mergescope.data.device_decode`; on the CPU within one level of :meth:`pixel_batch`'s pixels)."""
        blobs = list(data.split(lengths.tolist()))
        pixels = decode_batch(blobs, [self.paths[i] for i in ids.tolist()], device, self.preset == "imagenet",
                              self.image_size)
        return normalize_chw(pixels, self.mean, self.std)

    def image(self, i: int) -> Image.Image:
        return load_rgb(self.paths[i])

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256(b"mergescope.ImageFolderDataset/2\n")
        for path, label in zip(self.paths, self.targets):
            rel, st = Path(path).relative_to(self.root).as_posix(), os.stat(path)
            h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\t{int(label)}\n".encode())
        if self._memory is not None:
            h.update(self._memory.fingerprint.encode())  # the decoded pixels and labels
        return h.hexdigest()
