"""Small building blocks shared by the zoo: width scaling, argument checks, conv-BN-ReLU stacks."""

from __future__ import annotations

from torch import nn

from mergescope.errors import ArchitectureError


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1 (width multipliers may be fractional, e.g. 0.25)."""
    return max(1, int(round(channels * width)))


def check_positive(model: str, **values: float) -> None:
    """Raise ArchitectureError naming the first argument that isn't a number > 0."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ArchitectureError(f"model '{model}' needs {key} to be a number > 0, got {value!r}")


def conv_bn_relu(in_ch: int, out_ch: int, batchnorm: bool, kernel_size: int = 3) -> list[nn.Module]:
    """Conv (same padding) [+ BatchNorm] + ReLU; the conv has a bias only when there is no BatchNorm."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=not batchnorm)
    ]
    if batchnorm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.ReLU())  # not in-place: forward hooks on the previous layer keep their output
    return layers
