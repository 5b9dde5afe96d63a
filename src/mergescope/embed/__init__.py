"""Image embedders for CLIP-δ: CLIP via open_clip, a documented non-CLIP fallback, and a cache by image id.

``create_embedder("clip", model_name="ViT-B-32", pretrained="openai")`` or
``create_embedder("fallback", model=trained_model)``; :class:`EmbeddingCache` embeds each image id once.
"""
from ._registry import create_embedder, list_embedders, register_embedder
from .base import EMBEDDER_KINDS, ImageEmbedder, embed_in_batches
from .cache import EmbeddingCache
from .clip import ClipEmbedder
from .fallback import FallbackEmbedder

__all__ = [
    "ClipEmbedder", "EMBEDDER_KINDS", "EmbeddingCache", "FallbackEmbedder", "ImageEmbedder", "create_embedder",
    "embed_in_batches", "list_embedders", "register_embedder",
]
