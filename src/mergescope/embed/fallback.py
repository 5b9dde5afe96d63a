"""The documented fallback when CLIP is unavailable: penultimate features of a given (trained) model.

These are *not* CLIP embeddings: they measure similarity as that model sees it, so a CLIP-δ computed with them
says "fallback" in every report (:attr:`FallbackEmbedder.name`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import functional as TF

from ..data.normalize import IMAGENET_MEAN, IMAGENET_STD
from ..errors import MergescopeError
from ._registry import register_embedder
from .base import embed_in_batches


@register_embedder("fallback")
class FallbackEmbedder:
    """Embeds an image as the input of a model's classifier: its pooled, penultimate features.

    A forward hook on ``layer`` (default: the model's last ``nn.Linear``) captures that layer's input, flattened;
    the hook lives only inside :meth:`embed` and is removed in ``finally``; the model runs in eval mode and its
    train/eval flag is restored afterwards.

    Args:
        model: a trained model (a zoo model or a torchvision one).
        layer: ``named_modules()`` name of the module whose input is the embedding (default: last nn.Linear).
        label: what the name calls the model (default: its zoo name, else its class name).
        image_size: (H, W) images are resized to (default: ``model.input_size`` of zoo models, else 224×224).
        mean, std: per-channel normalization the model was trained with (default: ImageNet for 3 channels,
            0.5/0.5 for 1); pass the dataset's (e.g. ``CIFAR10_MEAN``/``CIFAR10_STD``).
        transform: replaces resize + normalize entirely: PIL image -> float [C, H, W].
        batch_size: images per forward pass.
    """

    kind = "fallback"

    def __init__(self, model: nn.Module, *, layer: str | None = None, label: str | None = None,
                 image_size: Sequence[int] | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None, batch_size: int = 64):
        if not isinstance(model, nn.Module):
            raise MergescopeError(f"the fallback embedder needs an nn.Module, got {type(model).__name__}")
        modules = dict(model.named_modules())
        if layer is None:
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            if not linears:
                raise MergescopeError(f"{type(model).__name__} has no nn.Linear classifier; name the module whose "
                                      "input to use with layer=...")
            layer = linears[-1]
        elif layer not in modules:
            raise MergescopeError(f"{type(model).__name__} has no module '{layer}'")
        arch = getattr(model, "mergescope_arch", None)
        label = label or (arch["name"] if isinstance(arch, dict) else type(model).__name__)
        self.model, self.layer, self.batch_size = model, layer, batch_size
        self.name = f"fallback (penultimate features of {label}), not CLIP"
        self.preprocess = transform or _default_transform(model, image_size, mean, std)

    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """float32 [n, d] L2-normalised penultimate features (CPU)."""
        captured: list[torch.Tensor] = []

        def hook(_module, inputs):
            captured.append(inputs[0].detach().flatten(1))  # [B,d]

        device = next(self.model.parameters()).device
        was_training = self.model.training
        handle = dict(self.model.named_modules())[self.layer].register_forward_pre_hook(hook)
        try:
            self.model.eval()

            def forward(x: torch.Tensor) -> torch.Tensor:
                captured.clear()
                self.model(x)
                if len(captured) != 1:
                    raise MergescopeError(f"layer '{self.layer}' ran {len(captured)} times in one forward pass; "
                                          "name a layer that runs exactly once with layer=...")
                return captured[0]

            return embed_in_batches(images, self.preprocess, forward, self.batch_size, device)
        finally:
            handle.remove()
            self.model.train(was_training)

    def __repr__(self) -> str:
        return f"FallbackEmbedder({self.name!r}, layer={self.layer!r})"


def _default_transform(model: nn.Module, image_size, mean, std) -> Callable[[Image.Image], torch.Tensor]:
    input_size = getattr(model, "input_size", None)  # zoo models: (C, H, W)
    channels = input_size[0] if input_size is not None and len(input_size) == 3 else 3
    size = list(image_size or (input_size[1:] if input_size is not None and len(input_size) == 3 else (224, 224)))
    mean = list(mean or (IMAGENET_MEAN if channels == 3 else (0.5,) * channels))
    std = list(std or (IMAGENET_STD if channels == 3 else (0.5,) * channels))
    if len(mean) != channels or len(std) != channels:
        raise MergescopeError(f"mean/std need {channels} values for a {channels}-channel model")
    mode = "L" if channels == 1 else "RGB"

    def transform(img: Image.Image) -> torch.Tensor:
        x = TF.to_tensor(TF.resize(img.convert(mode), size, antialias=True))  # [C,H,W] in 0..1
        return TF.normalize(x, mean, std)

    return transform
