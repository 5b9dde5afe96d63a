"""A dataset held as one uint8 tensor; batches are sliced and normalized in a single vectorized step."""

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from mergescope.data.base import ImageDataset, as_ids
from mergescope.data.normalize import normalize_uint8
from mergescope.errors import DatasetError


class InMemoryDataset(ImageDataset):
    """Decoded images in memory.

    Fingerprint: sha256 over the array shape, the uint8 pixel bytes (N, H, W, C order) and the int64
    labels. Class names and normalization are not part of it.
    """

    in_memory = True

    def __init__(self, images, labels, classes: Sequence[str], mean: Sequence[float], std: Sequence[float],
                 name: str = "memory"):
        """
        Args:
            images: uint8 [N, H, W, C] tensor or array (C = 1 or 3).
            labels: N ints in ``0..len(classes)-1``.
            classes: class names.
            mean, std: C per-channel values on the 0..1 scale.
            name: dataset name.
        """
        images = torch.as_tensor(images).cpu()
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
            raise DatasetError(f"{name}: images must be uint8 [N,H,W,C] with C = 1 or 3, "
                               f"got {images.dtype} {list(images.shape)}")
        self.images = images.contiguous()  # [N,H,W,C] uint8
        self._array = self.images.numpy()  # [N,H,W,C] shares memory with images
        self.targets = np.asarray(labels, dtype=np.int64).reshape(-1)  # [N]
        if self.targets.shape[0] != images.shape[0]:
            raise DatasetError(f"{name}: {images.shape[0]} images but {self.targets.shape[0]} labels")
        self.classes = [str(c) for c in classes]
        if self.targets.size and (self.targets.min() < 0 or self.targets.max() >= len(self.classes)):
            raise DatasetError(f"{name}: labels outside 0..{len(self.classes) - 1}")
        self.num_channels = int(images.shape[3])
        if len(mean) != self.num_channels or len(std) != self.num_channels:
            raise DatasetError(f"{name}: mean/std need {self.num_channels} values each")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.image_size = (int(images.shape[1]), int(images.shape[2]))
        self.name = name
        self._labels = torch.from_numpy(self.targets)  # [N] int64

    def get_batch(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        ids = as_ids(ids, len(self))
        pixels = self._array[ids.numpy()]  # [B,H,W,C] (numpy gathers rows far faster than torch here)
        return normalize_uint8(pixels, self.mean, self.std), self._labels[ids]  # [B,C,H,W], [B]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        x, y = self.get_batch([i % len(self)])
        return x[0], int(y[0])

    def image(self, i: int) -> Image.Image:
        pixels = self._array[i]  # [H,W,C]
        return Image.fromarray(pixels[:, :, 0] if self.num_channels == 1 else pixels)  # L or RGB

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256(b"mergescope.InMemoryDataset/1")
        h.update(repr(tuple(self.images.shape)).encode())
        h.update(memoryview(self._array.reshape(-1)))  # no copy
        h.update(self.targets.astype("<i8").tobytes())
        return h.hexdigest()
