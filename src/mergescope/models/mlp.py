"""``mlp``: flatten -> (Linear, ReLU) x depth -> Linear."""

from __future__ import annotations

import torch
from torch import nn

from mergescope.errors import ArchitectureError
from mergescope.models._layers import check_positive
from mergescope.models._registry import register_model


class MLP(nn.Module):
    """Fully connected classifier on flattened inputs."""

    def __init__(self, in_features: int, width: int, depth: int, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_features
        for _ in range(depth):
            layers += [nn.Linear(prev, width), nn.ReLU()]
            prev = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)  # [B, C, H, W] -> [B, in_features]
        return self.classifier(self.features(x))  # [B, num_classes]


@register_model("mlp", image_size=None)
def mlp(
    num_classes: int = 10,
    in_channels: int = 1,
    in_features: int = 64,
    width: int = 128,
    depth: int = 3,
) -> MLP:
    """MLP; ``in_features`` is the flattened input size (C*H*W, 64 for 1x8x8 digits).

    ``in_channels`` only checks that ``in_features`` is a whole number of channels.
    """
    check_positive("mlp", num_classes=num_classes, in_channels=in_channels, in_features=in_features, width=width)
    if depth < 0:
        raise ArchitectureError(f"model 'mlp' needs depth >= 0, got {depth}")
    if in_features % in_channels:
        raise ArchitectureError(
            f"model 'mlp': in_features={in_features} is not a multiple of in_channels={in_channels}"
        )
    return MLP(in_features, width, depth, num_classes)
