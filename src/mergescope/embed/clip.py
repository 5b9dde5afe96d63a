"""CLIP image embeddings via open_clip (optional dependency: ``pip install open_clip_torch``).

Weights are never fetched behind the user's back: a pretrained tag is used only if open_clip's download cache
already holds it, unless ``download=True``. Anything that prevents loading raises :class:`MergescopeError` with a
one-line message that names the documented fallback, :class:`~mergescope.embed.FallbackEmbedder`.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
from PIL import Image

from ..errors import MergescopeError
from ._registry import register_embedder
from .base import embed_in_batches

FALLBACK_HINT = ("or use the fallback embedder, create_embedder('fallback', model=<a trained model>) "
                 "(penultimate features, not CLIP)")


@register_embedder("clip")
class ClipEmbedder:
    """CLIP image encoder (open_clip); embeddings are L2-normalised ``encode_image`` outputs.

    Args:
        model_name: an open_clip model name (``open_clip.list_models()``), e.g. ``"ViT-B-32"``. For OpenAI
            weights loaded from a file use the ``-quickgelu`` variant (e.g. ``"ViT-B-32-quickgelu"``).
        pretrained: a weights file, or a tag (``open_clip.list_pretrained_tags_by_model(model_name)``).
        download: allow open_clip to download a tag's weights that are not in its cache yet.
        cache_dir: open_clip/Hugging Face cache directory (default: theirs).
        device: where the encoder runs (default CPU).
        batch_size: images per forward pass.

    Raises:
        MergescopeError: open_clip missing, unknown model or tag, weights file missing, tag not cached and
            ``download=False``, or loading failed — each with the fallback named.
    """

    kind = "clip"

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str = "openai", *, download: bool = False,
                 cache_dir: str | None = None, device: torch.device | str | None = None, batch_size: int = 64):
        open_clip = _import_open_clip()
        where = f"CLIP weights '{pretrained}' for {model_name}"
        if model_name not in open_clip.list_models():
            raise MergescopeError(f"open_clip has no model '{model_name}'; pick one of open_clip.list_models(), "
                                  f"{FALLBACK_HINT}")
        kwargs: dict[str, Any] = {}
        if os.path.isfile(str(pretrained)):
            weights = str(pretrained)
        elif os.sep in str(pretrained) or str(pretrained).endswith((".bin", ".pt", ".pth", ".safetensors")):
            raise MergescopeError(f"{where}: no such file; pass an existing weights file, {FALLBACK_HINT}")
        else:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if pretrained not in tags:
                raise MergescopeError(f"{where}: unknown tag; use one of {', '.join(tags) or '(none)'}, "
                                      f"{FALLBACK_HINT}")
            cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
            cached = _cached_weights(cfg, cache_dir)
            if cached is None and not download:
                raise MergescopeError(f"{where} are not in the local cache and download=False; pass pretrained="
                                      f"<weights file> or download=True (needs internet), {FALLBACK_HINT}")
            weights = cached or pretrained
            if cached is not None:  # a file path loses the tag's settings: pass them explicitly
                kwargs = {"force_quick_gelu": bool(cfg.get("quick_gelu", False)), "image_mean": cfg.get("mean"),
                          "image_std": cfg.get("std"), "image_interpolation": cfg.get("interpolation"),
                          "image_resize_mode": cfg.get("resize_mode")}
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=weights, device=device or "cpu", cache_dir=cache_dir, **kwargs)
        except Exception as e:  # noqa: BLE001 -- open_clip raises RuntimeError/OSError/KeyError/...
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise MergescopeError(f"{where} could not be loaded ({reason}); check them, {FALLBACK_HINT}") from e
        self._setup(model, preprocess, f"CLIP {model_name} ({pretrained})", device, batch_size)

    @classmethod
    def from_model(cls, model: torch.nn.Module, preprocess: Callable[[Image.Image], torch.Tensor], *, name: str,
                   device: torch.device | str | None = None, batch_size: int = 64) -> "ClipEmbedder":
        """Wrap an open_clip model built elsewhere (anything with ``encode_image``) and its image transform."""
        self = cls.__new__(cls)
        self._setup(model, preprocess, name, device, batch_size)
        return self

    def _setup(self, model, preprocess, name: str, device, batch_size: int) -> None:
        if not hasattr(model, "encode_image"):
            raise MergescopeError(f"{type(model).__name__} has no encode_image; not an open_clip model")
        self.device = torch.device(device or next(model.parameters()).device)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.name = name
        self.batch_size = batch_size

    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """float32 [n, d] L2-normalised CLIP image embeddings (CPU)."""
        return embed_in_batches([im.convert("RGB") for im in images], self.preprocess, self.model.encode_image,
                                self.batch_size, self.device)

    def __repr__(self) -> str:
        return f"ClipEmbedder({self.name!r})"


def _import_open_clip():
    try:
        import open_clip
    except ImportError:
        raise MergescopeError(f"CLIP embeddings need open_clip: pip install open_clip_torch, {FALLBACK_HINT}") \
            from None
    return open_clip


def _cached_weights(cfg: dict, cache_dir: str | None) -> str | None:
    """Path of a pretrained tag's weights in open_clip's caches, or None; never touches the network."""
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        model_id, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        names = [*_safe_alternatives(filename), filename]  # the order open_clip tries them in
        for n in names:
            found = try_to_load_from_cache(model_id, n, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = cfg.get("url", "")
    if url:
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(path):
            return path
    return None


def _safe_alternatives(filename: str) -> list[str]:
    try:
        from open_clip.pretrained import _get_safe_alternatives
        return list(_get_safe_alternatives(filename))
    except Exception:  # noqa: BLE001 -- private helper gone: no alternatives
        return []
