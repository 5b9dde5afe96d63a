"""Per-channel normalization of uint8 image batches, and the reference statistics we use."""

from collections.abc import Sequence

import numpy as np
import torch

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


def normalize_uint8(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Turn channels-last uint8 pixels into normalized, contiguous channels-first float32.

    Same arithmetic as torchvision's ``ToTensor`` + ``Normalize`` (divide by 255, subtract mean,
    divide by std), so a single image and a whole batch give bit-identical values.

    Args:
        pixels: uint8 [B, H, W, C] numpy array.
        mean, std: C values each, on the 0..1 scale.

    Returns:
        float32 [B, C, H, W].
    """
    # transposing while converting in numpy is several times faster than a strided torch copy
    return normalize_chw(torch.from_numpy(pixels.transpose(0, 3, 1, 2).astype(np.float32, order="C")), mean, std)


def normalize_chw(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float32 [B, C, H, W] of channels-first pixels (uint8, or float32 on the 0..255 scale, which is divided in
    place) on whatever device they are: ÷ 255, − mean, ÷ std, the arithmetic of :func:`normalize_uint8`."""
    c = pixels.shape[1]
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, c, 1, 1)  # [1,C,1,1]
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, c, 1, 1)  # [1,C,1,1]
    return pixels.float().div_(255.0).sub_(mean_t).div_(std_t)
