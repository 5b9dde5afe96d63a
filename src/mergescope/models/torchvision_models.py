"""Adapters registering torchvision architectures (``tv_*``), randomly initialised or from a local weights file."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torchvision
from torch import nn

from mergescope.errors import ArchitectureError
from mergescope.models._layers import check_positive
from mergescope.models._registry import register_model
from mergescope.models.weights import apply_state_dict, load_state_dict_file


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the stem conv for one taking ``in_channels`` inputs (same kernel/stride/padding, fresh init)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                new = nn.Conv2d(
                    in_channels, child.out_channels, child.kernel_size,
                    stride=child.stride, padding=child.padding, bias=child.bias is not None,
                )
                setattr(parent, child_name, new)
                return
    raise ArchitectureError(f"{type(model).__name__} has no Conv2d to adapt to {in_channels} input channels")


def _build(
    name: str, factory: Callable[..., nn.Module], num_classes: int, in_channels: int, weights_path: str | None
) -> nn.Module:
    check_positive(name, num_classes=num_classes, in_channels=in_channels)
    model = factory(weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    if weights_path is not None:
        apply_state_dict(model, load_state_dict_file(weights_path), source=str(Path(weights_path)), arch=name)
    return model


def _register(name: str, factory: Callable[..., nn.Module]) -> None:
    """Register ``name`` as a builder around torchvision's ``factory``."""

    def builder(num_classes: int = 10, in_channels: int = 3, weights_path: str | None = None) -> nn.Module:
        """torchvision model with ``weights=None``; ``weights_path`` loads a local state dict file."""
        return _build(name, factory, num_classes, in_channels, weights_path)

    builder.__name__ = name
    register_model(name, transient=("weights_path",), image_size=(224, 224))(builder)


for _name, _factory in {
    "tv_alexnet": torchvision.models.alexnet,
    "tv_vgg11": torchvision.models.vgg11,
    "tv_vgg11_bn": torchvision.models.vgg11_bn,
    "tv_resnet18": torchvision.models.resnet18,
    "tv_resnet50": torchvision.models.resnet50,
}.items():
    _register(_name, _factory)
