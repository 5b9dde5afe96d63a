"""The dataset interface every mergescope dataset implements: fixed integer ids, batch access, raw images."""

from functools import cached_property

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


def as_ids(ids, n: int) -> torch.Tensor:
    """Validate ids (tensor, array or sequence of ints) against a dataset of ``n`` images.

    Returns:
        int64 [B] on the CPU. Raises IndexError for an id outside ``0..n-1``.
    """
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).cpu()  # [B]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise IndexError(f"ids must lie in 0..{n - 1}, got {int(ids.min())}..{int(ids.max())}")
    return ids


class ImageDataset(Dataset):
    """An image classification dataset where image ``i`` always has id ``i``.

    Subclasses set the attributes below and implement ``__getitem__``, ``image`` and
    ``_compute_fingerprint``; they may override ``get_batch`` with something faster.

    Attributes:
        name: short dataset name (e.g. ``"cifar10"``).
        classes: class names; label ``y`` means ``classes[y]``.
        targets: int64 [N], the label of every image.
        num_channels: C of the tensors ``__getitem__`` returns.
        image_size: (H, W) of those tensors, i.e. after transforms.
        in_memory: True when ``get_batch`` slices decoded pixels held in memory (no DataLoader needed).
    """

    name: str
    classes: list[str]
    targets: np.ndarray
    num_channels: int
    image_size: tuple[int, int]
    in_memory: bool = False

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Image ``i`` as normalized float32 [C, H, W] and its label."""
        raise NotImplementedError

    def image(self, i: int) -> Image.Image:
        """The raw decoded image ``i`` (RGB or L), before any resize or normalization, for rendering."""
        raise NotImplementedError

    def _compute_fingerprint(self) -> str:
        raise NotImplementedError

    @cached_property
    def fingerprint(self) -> str:
        """sha256 hex digest identifying the content; what is hashed is documented by each subclass."""
        return self._compute_fingerprint()

    def get_batch(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels for ``ids``.

        Args:
            ids: int64 [B] (or anything ``torch.as_tensor`` turns into it).

        Returns:
            x float32 [B, C, H, W], y int64 [B].
        """
        ids = as_ids(ids, len(self))
        items = [self[int(i)] for i in ids]
        if not items:
            return torch.empty(0, self.num_channels, *self.image_size), torch.empty(0, dtype=torch.int64)
        x = torch.stack([item[0] for item in items])  # [B,C,H,W]
        y = torch.tensor([item[1] for item in items], dtype=torch.int64)  # [B]
        return x, y

    def __repr__(self) -> str:
        h, w = self.image_size
        return (f"{type(self).__name__}(name={self.name!r}, n={len(self)}, classes={self.num_classes}, "
                f"shape={self.num_channels}x{h}x{w})")
