"""``vgg11`` / ``vgg11_bn``: VGG11 for 32x32 inputs with a single linear classifier (the usual CIFAR variant)."""

from __future__ import annotations

import torch
from torch import nn

from mergescope.models._layers import check_positive, conv_bn_relu, scaled
from mergescope.models._registry import register_model

# Output channels of each 3x3 conv; "M" is a 2x2 max-pool. Five pools take 32x32 to 1x1.
VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """VGG feature stack followed by one linear layer."""

    def __init__(self, cfg: tuple[int | str, ...], in_channels: int, width: float, num_classes: int, batchnorm: bool):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out = scaled(int(item), width)
                layers += conv_bn_relu(prev, out, batchnorm)
                prev = out
        self.features = nn.Sequential(*layers)  # [B, 3, 32, 32] -> [B, 512w, 1, 1]
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)  # [B, 512w]
        return self.classifier(x)  # [B, num_classes]


def _vgg11(name: str, num_classes: int, in_channels: int, width: float, batchnorm: bool) -> VGG:
    check_positive(name, num_classes=num_classes, in_channels=in_channels, width=width)
    return VGG(VGG11_CFG, in_channels, width, num_classes, batchnorm)


@register_model("vgg11")
def vgg11(num_classes: int = 10, in_channels: int = 3, width: float = 1) -> VGG:
    """VGG11 without BatchNorm (convs have biases); ``width`` multiplies every channel count."""
    return _vgg11("vgg11", num_classes, in_channels, width, batchnorm=False)


@register_model("vgg11_bn")
def vgg11_bn(num_classes: int = 10, in_channels: int = 3, width: float = 1) -> VGG:
    """VGG11 with BatchNorm after every conv; ``width`` multiplies every channel count."""
    return _vgg11("vgg11_bn", num_classes, in_channels, width, batchnorm=True)
