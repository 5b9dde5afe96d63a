"""Every model's top-k image tiles of any channel of a feature study, read back from what the study stored — the
probe's top-k ids (``probe/``), the view recipes (``results.json["features"]["views"]``), the regression's hard
channels (``regression_topk.json``) — and placed on the sprite sheets the feature pages already wrote
(:func:`mergescope.report.sprites.sprite_layout`, in the cells their stamp records:
:func:`~mergescope.report.sprites.sheet_geometry`): nothing is decoded or drawn again, so a page with any number of
channels links the same few PNGs by relative URL.
"""
from __future__ import annotations

import json
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import MergescopeError
from .features import TILE, channel_href, view_from_record
from .sprites import PER_SHEET, Tile, sheet_geometry, sheet_size, sprite_layout

FEATURES_DIR = "features"  # the feature pages (and their sprites/) inside a feature study's run folder
SPRITES_DIR = "sprites"


@dataclass(frozen=True)
class ImageRow:
    """One model's top-k images of a channel: its label, the view it comes from, and its tiles."""

    label: str
    slug: str  # the feature view ("pair", "many", "regress") whose sprite sheet holds the tiles
    ids: tuple[int, ...]
    values: tuple[float | None, ...]
    tiles: tuple[Tile, ...]  # sheet paths relative to the study's features/ folder (drawn: sprites.drawn)


@dataclass(frozen=True)
class _View:
    slug: str
    rows: dict[str, np.ndarray]  # label -> top-k ids [C, k] (-1: not shown)
    values: dict[str, np.ndarray]  # label -> top-k activations [C, k]
    channels: Sequence[int] | None = None  # the channels the view shows (None: all)


def _prefix(slug: str, layer: str) -> str:
    """The sprite-sheet prefix of a view's layer: its first page's name without ``.html``."""
    return channel_href(slug, layer, 0).split("#")[0].removesuffix(".html")


class ChannelImages:
    """Image rows of every channel of a feature study's run folder (see the module docstring).

    Example:
        >>> images = ChannelImages("study/features")
        >>> [r.label for r in images.rows("layer1.0", 3)]   # A, B before permutation, B aligned, merges, C aligned…
    """

    def __init__(self, run_dir: str | os.PathLike):
        from ..probe import load_probe

        self.run_dir = Path(run_dir)
        results = json.loads((self.run_dir / "results.json").read_text(encoding="utf-8"))
        recipes = (results.get("features") or {}).get("views") or []
        probe = load_probe(self.run_dir / "probe") if recipes else None
        self._views: dict[str, dict[str, _View]] = {}  # layer -> slug -> view
        for recipe in recipes:
            models = recipe["rows"]
            for layer in probe.layers.get(next(iter(models.values())), []):
                rows = {label: probe[m, layer].topk_ids.numpy() for label, m in models.items()}
                vals = {label: probe[m, layer].topk_values.numpy() for label, m in models.items()}
                self._views.setdefault(layer, {})[recipe["slug"]] = _View(recipe["slug"], rows, vals)
        self._models = {recipe["slug"]: dict(recipe["rows"]) for recipe in recipes}
        regression = results.get("regression") or {}
        stored = self.run_dir / str(regression.get("views", ""))
        if regression.get("views") and stored.is_file():
            for record in json.loads(stored.read_text(encoding="utf-8"))["views"]:
                v = view_from_record(record)
                self._views.setdefault(v.layer, {})[v.slug] = _View(v.slug, dict(v.rows), dict(v.values), v.order)
        self._tiles: dict[tuple[str, str], dict[int, Tile]] = {}

    @property
    def layers(self) -> list[str]:
        return list(self._views)

    def channels(self, layer: str) -> int:
        """Number of channels of ``layer`` (0 if no view shows it)."""
        views = self._views.get(layer, {})
        return max((int(next(iter(v.rows.values())).shape[0]) for v in views.values() if v.rows), default=0)

    def shows(self, slug: str, layer: str, channel: int) -> bool:
        """Whether view ``slug`` has images of this channel (the regression's view only has its hard channels)."""
        view = self._views.get(layer, {}).get(slug)
        return view is not None and (view.channels is None or channel in view.channels)

    def page_href(self, slug: str, layer: str, channel: int) -> str:
        """The channel on view ``slug``'s feature page, relative to the run folder."""
        return f"{FEATURES_DIR}/{channel_href(slug, layer, channel)}"

    def rows(self, layer: str, channel: int, slugs: Sequence[str] = ("pair", "many", "regress"),
             only: Collection[str] | None = None) -> list[ImageRow]:
        """The channel's image rows of the given views in order; a model already shown by an earlier view (A and
        B aligned appear in both "pair" and "many") is not repeated. ``only``: keep the rows whose label or probe
        model name is in it."""
        out: list[ImageRow] = []
        shown: set[str] = set()
        for slug in slugs:
            view = self._views.get(layer, {}).get(slug)
            if view is None or not self.shows(slug, layer, channel):
                continue
            tiles = self._layout(view, layer)
            for label, ids in view.rows.items():
                model = self._models.get(slug, {}).get(label)
                if only is not None and label not in only and model not in only:
                    continue
                if model is not None:
                    if model in shown:
                        continue
                    shown.add(model)
                keep = [j for j, i in enumerate(ids[channel]) if i >= 0]
                vals = view.values.get(label)
                out.append(ImageRow(label, slug, tuple(int(ids[channel][j]) for j in keep),
                                    tuple(None if vals is None or not np.isfinite(vals[channel][j])
                                          else float(vals[channel][j]) for j in keep),
                                    tuple(tiles[int(ids[channel][j])] for j in keep)))
        return out

    def sheet_url(self, tile: Tile, page_dir: str | os.PathLike) -> str:
        """URL of a tile's sheet relative to a page written in ``page_dir``."""
        return f"{self._features_url(str(page_dir))}/{tile.sheet}"

    @lru_cache(maxsize=64)
    def _features_url(self, page_dir: str) -> str:
        return Path(os.path.relpath(self.run_dir / FEATURES_DIR, page_dir)).as_posix()

    def _layout(self, view: _View, layer: str) -> dict[int, Tile]:
        key = (view.slug, layer)
        if key not in self._tiles:
            ids = np.concatenate([np.asarray(v).ravel() for v in view.rows.values()])
            ids = np.unique(ids[ids >= 0])
            prefix = _prefix(view.slug, layer)
            folder = self.run_dir / FEATURES_DIR / SPRITES_DIR
            ext, cell = sheet_geometry(folder, prefix) or (None, (TILE, TILE))  # no stamp: finished tiles
            ext = ext or next((e for e in ("png", "jpg") if (folder / f"{prefix}_0.{e}").is_file()), None)
            if (ext is None or not (folder / f"{prefix}_0.{ext}").is_file()) and len(ids):
                raise MergescopeError(f"no sprite sheet {prefix}_0.png/.jpg in {folder}: re-render the feature pages "
                                      f"(mergescope report {self.run_dir})")
            tiles = sprite_layout(ids, SPRITES_DIR, prefix, ext or "png", TILE, PER_SHEET, cell)
            for n, start in enumerate(range(0, len(ids), PER_SHEET)):
                path = folder / f"{prefix}_{n}.{ext}"
                want = sheet_size(len(ids[start:start + PER_SHEET]), *cell)
                with Image.open(path) as im:  # reads the header only
                    if im.size != want:
                        raise MergescopeError(f"sprite sheet {path} is {im.size[0]}×{im.size[1]} px, not the "
                                              f"{want[0]}×{want[1]} of its feature pages' layout: re-render them "
                                              f"(mergescope report {self.run_dir})")
            self._tiles[key] = tiles
        return self._tiles[key]


__all__ = ["ChannelImages", "ImageRow"]
