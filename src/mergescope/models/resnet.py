"""``resnet20``: the CIFAR ResNet (3 stages x 3 BasicBlocks, 16w/32w/64w channels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mergescope.models._layers import check_positive, scaled
from mergescope.models._registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut (identity, or 1x1 conv stride 2 + BN when the shape changes)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # [B, out, H/s, W/s]
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem conv, three stages of BasicBlocks (stride 1, 2, 2), global average pool, linear."""

    def __init__(self, blocks_per_stage: int, in_channels: int, width: float, num_classes: int):
        super().__init__()
        channels = [scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        stages: list[nn.Module] = []
        prev = channels[0]
        for i, ch in enumerate(channels):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(prev, ch, stride))
                prev = ch
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # [B, 16w, 32, 32]
        x = self.layer3(self.layer2(self.layer1(x)))  # [B, 64w, 8, 8]
        x = torch.flatten(self.pool(x), 1)  # [B, 64w]
        return self.fc(x)  # [B, num_classes]


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, width: float = 1) -> CifarResNet:
    """CIFAR ResNet20 with BatchNorm; ``width`` multiplies every channel count."""
    check_positive("resnet20", num_classes=num_classes, in_channels=in_channels, width=width)
    return CifarResNet(3, in_channels, width, num_classes)
