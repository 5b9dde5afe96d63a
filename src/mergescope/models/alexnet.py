"""``alexnet_cifar``: an AlexNet-style network for 32x32 inputs, without BatchNorm."""

from __future__ import annotations

import torch
from torch import nn

from mergescope.errors import ArchitectureError
from mergescope.models._layers import check_positive, conv_bn_relu, scaled
from mergescope.models._registry import register_model


class CifarAlexNet(nn.Module):
    """Five convs with ReLU and three max-pools, then three linear layers (ReLU + dropout between)."""

    def __init__(self, in_channels: int, width: float, num_classes: int, dropout: float):
        super().__init__()
        c1, c2, c3, c4, c5 = (scaled(c, width) for c in (64, 192, 384, 256, 256))
        hidden = scaled(1024, width)
        self.features = nn.Sequential(
            *conv_bn_relu(in_channels, c1, batchnorm=False, kernel_size=5),  # [B, c1, 32, 32]
            nn.MaxPool2d(2),  # [B, c1, 16, 16]
            *conv_bn_relu(c1, c2, batchnorm=False, kernel_size=5),
            nn.MaxPool2d(2),  # [B, c2, 8, 8]
            *conv_bn_relu(c2, c3, batchnorm=False),
            *conv_bn_relu(c3, c4, batchnorm=False),
            *conv_bn_relu(c4, c5, batchnorm=False),
            nn.MaxPool2d(2),  # [B, c5, 4, 4]
        )
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(c5 * 4 * 4, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)  # [B, 16 * c5]
        return self.classifier(x)  # [B, num_classes]


@register_model("alexnet_cifar")
def alexnet_cifar(
    num_classes: int = 10, in_channels: int = 3, width: float = 1, dropout: float = 0.5
) -> CifarAlexNet:
    """CIFAR AlexNet (no BatchNorm); ``width`` multiplies conv channels and the 1024-unit hidden layers."""
    check_positive("alexnet_cifar", num_classes=num_classes, in_channels=in_channels, width=width)
    if not 0 <= dropout < 1:
        raise ArchitectureError(f"model 'alexnet_cifar' needs 0 <= dropout < 1, got {dropout!r}")
    return CifarAlexNet(in_channels, width, num_classes, dropout)
