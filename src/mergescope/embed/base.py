"""What an image embedder is, and the batching every embedder shares."""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch
from PIL import Image

from ..errors import NumericsError

EMBEDDER_KINDS = ("clip", "fallback")


@runtime_checkable
class ImageEmbedder(Protocol):
    """Maps images to L2-normalised vectors, e.g. for CLIP-δ.

    Attributes:
        name: says exactly what embeds, e.g. ``"CLIP ViT-B-32 (openai)"`` or
            ``"fallback (penultimate features of resnet20), not CLIP"``; reports print it.
        kind: ``"clip"`` or ``"fallback"``.
    """

    name: str
    kind: str

    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """float32 [n, d] on the CPU, every row of unit L2 norm."""
        ...


def embed_in_batches(images: list[Image.Image], preprocess: Callable[[Image.Image], torch.Tensor],
                     forward: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
                     device: torch.device) -> torch.Tensor:
    """Preprocess, stack and run ``forward`` on batches; float32 [n, d] CPU rows, L2-normalised."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = torch.stack([preprocess(im) for im in images[start:start + batch_size]]).to(device)  # [B,C,H,W]
            out.append(forward(x).reshape(x.shape[0], -1).float().cpu())  # [B,d]
    if not out:
        return torch.empty(0, 0)
    feats = torch.cat(out)  # [n,d]
    norm = feats.norm(dim=1, keepdim=True)
    bad = ~(torch.isfinite(norm[:, 0]) & (norm[:, 0] > 0))
    if bad.any():
        raise NumericsError(f"image {int(bad.nonzero()[0])} of the batch has a zero or non-finite embedding")
    return feats / norm
