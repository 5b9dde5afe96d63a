"""``cnn_digits``: a small CNN for 8x8 single-channel digits."""

from __future__ import annotations

import torch
from torch import nn

from mergescope.models._layers import check_positive, conv_bn_relu
from mergescope.models._registry import register_model


class DigitsCNN(nn.Module):
    """conv(w) -> conv(2w) -> pool -> conv(4w) -> pool -> linear, for 8x8 inputs."""

    def __init__(self, in_channels: int, width: int, num_classes: int, batchnorm: bool):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(in_channels, width, batchnorm),  # [B, w, 8, 8]
            *conv_bn_relu(width, 2 * width, batchnorm),  # [B, 2w, 8, 8]
            nn.MaxPool2d(2),  # [B, 2w, 4, 4]
            *conv_bn_relu(2 * width, 4 * width, batchnorm),  # [B, 4w, 4, 4]
            nn.MaxPool2d(2),  # [B, 4w, 2, 2]
        )
        self.classifier = nn.Linear(4 * width * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)  # [B, 16w]
        return self.classifier(x)  # [B, num_classes]


@register_model("cnn_digits", image_size=(8, 8))
def cnn_digits(num_classes: int = 10, in_channels: int = 1, width: int = 32, batchnorm: bool = True) -> DigitsCNN:
    """CNN for 8x8 inputs (sklearn digits); other input sizes fail at the classifier."""
    check_positive("cnn_digits", num_classes=num_classes, in_channels=in_channels, width=width)
    return DigitsCNN(in_channels, width, num_classes, batchnorm)
