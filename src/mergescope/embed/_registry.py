"""Embedder registry: constructors register under a name; ``create_embedder`` builds them."""
from __future__ import annotations

import inspect
from typing import Any, Callable

from ..errors import MergescopeError
from .base import ImageEmbedder

_REGISTRY: dict[str, Callable[..., ImageEmbedder]] = {}


def register_embedder(name: str) -> Callable[[Callable[..., ImageEmbedder]], Callable[..., ImageEmbedder]]:
    """Decorator registering an embedder class or factory under ``name`` (unique)."""

    def decorator(factory: Callable[..., ImageEmbedder]) -> Callable[..., ImageEmbedder]:
        if name in _REGISTRY:
            raise MergescopeError(f"embedder name '{name}' is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_embedders() -> list[str]:
    """Names of all registered embedders, sorted."""
    return sorted(_REGISTRY)


def create_embedder(name: str, **kwargs: Any) -> ImageEmbedder:
    """Build a registered embedder, e.g. ``create_embedder("clip", model_name="ViT-B-32", pretrained="openai")``.

    Raises:
        MergescopeError: unknown name or arguments, or (from the embedder) weights that cannot be loaded.
    """
    if name not in _REGISTRY:
        raise MergescopeError(f"unknown embedder '{name}'; known embedders: {', '.join(list_embedders())}")
    factory = _REGISTRY[name]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise MergescopeError(f"embedder '{name}': {e}") from None
    return factory(**kwargs)
