"""One page per channel of a study: every model's top-k images (A, B before permutation, B aligned, the merges, the
other aligned models, the regressed B of a hard channel), every metric of ``compare.csv`` with its similar / not
judgement and the layer's null threshold, and the regression's R² and recovered top-k of ``regression.csv``.

Pages are small: the image tiles are the feature pages' sprite sheets, linked by relative URL
(:class:`~mergescope.report.channel_images.ChannelImages`), never embedded.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..runs.atomic import atomic_write_text
from ..timing import staged
from .channel_images import ChannelImages, ImageRow
from .compare_pages import _safe, delta_label, model_label
from .features import TILE
from .html import _environment
from .sprites import Drawn, drawn

CHANNELS_DIR = "channels"
METRIC_NAMES = (("kendall_tau", "Kendall τ"), ("clip_delta", "δ"), ("overlap", "top-k overlap"),
                ("correlation", "matching correlation"))
CATEGORY_NAMES = (("category", "Observation 2 (null)"), ("category_id_overlap", "Observation 2 by image ids"),
                  ("category_embedding", "Observation 2 by embedding"), ("consensus", "Observation 3 (null)"),
                  ("consensus_fixed_threshold", "Observation 3, fixed threshold"))


def channel_page(layer: str, channel: int) -> str:
    """Path of a channel's page relative to the study folder."""
    return f"{CHANNELS_DIR}/{_safe(layer)}/c{channel}.html"


@dataclass
class ChannelTables:
    """The per-channel rows of a feature study: ``compare.csv`` and ``regression.csv``, indexed by (layer, channel).

    Attributes:
        compare: (layer, channel) -> one ``compare.csv`` row per compared model, in the file's order.
        regression: (layer, channel) -> ``regression.csv`` rows (m, refit, r2_heldout, r2_in_sample, recovered).
        delta: how δ is called ("CLIP-δ" only for CLIP embeddings).
    """

    compare: dict[tuple[str, int], list[dict]] = field(default_factory=dict)
    regression: dict[tuple[str, int], list[dict]] = field(default_factory=dict)
    delta: str = "δ"

    @classmethod
    def read(cls, run_dir: str | os.PathLike) -> ChannelTables:
        """Read ``compare.csv`` and ``regression.csv`` of a feature study (either may be absent)."""
        from ..compare import read_compare_csv

        run_dir = Path(run_dir)
        out = cls()
        if (run_dir / "compare.csv").is_file():
            rows = read_compare_csv(run_dir / "compare.csv")
            for r in rows:
                out.compare.setdefault((r["layer"], r["channel"]), []).append(r)
            kinds = {r["embedder_kind"] for r in rows if r["embedder_kind"]}
            out.delta = delta_label("clip" if kinds == {"clip"} else "fallback") if kinds else "δ"
        if (run_dir / "regression.csv").is_file():
            with open(run_dir / "regression.csv", newline="", encoding="utf-8") as f:
                for r in csv.DictReader(f):
                    row = {"m": int(r["m"]), "refit": r["refit"] == "true",
                           **{k: float(r[k]) if r[k] != "" else None
                              for k in ("r2_heldout", "r2_in_sample", "recovered")}}
                    out.regression.setdefault((r["layer"], int(r["channel"])), []).append(row)
        return out

    def layers(self) -> list[str]:
        """Layers in the order ``compare.csv`` (then ``regression.csv``) lists them."""
        return list(dict.fromkeys([layer for layer, _ in self.compare] + [layer for layer, _ in self.regression]))

    def channels(self, layer: str) -> list[int]:
        return sorted({c for (name, c) in [*self.compare, *self.regression] if name == layer})


def metric_cells(rows: Sequence[Mapping], delta: str) -> list[dict]:
    """Per metric, per compared model: value, judgement ("similar" / "not similar" / "—") and threshold."""
    out = []
    for metric, name in METRIC_NAMES:
        cells = []
        for r in rows:
            v, similar, t = r.get(metric), r.get(f"similar_{metric}"), r.get(f"null_threshold_{metric}")
            flag = {"kendall_tau": "kendall_defined", "clip_delta": "clip_delta_defined"}.get(metric)
            usable = v is not None and not r["dead"] and (flag is None or bool(r.get(flag, True)))
            side = "<" if metric == "clip_delta" else ">"
            cells.append({"value": v, "usable": usable,
                          "judged": "—" if similar is None else "similar" if similar else "not similar",
                          "threshold": None if t is None else f"{side} {t:.3g}"})
        if any(c["value"] is not None for c in cells):
            out.append({"name": delta if metric == "clip_delta" else name, "cells": cells})
    return out


def category_cells(rows: Sequence[Mapping]) -> list[dict]:
    """Per category column with a value: the category of each compared model's row."""
    return [{"name": name, "cells": [r.get(col) or "—" for r in rows]}
            for col, name in CATEGORY_NAMES if any(r.get(col) for r in rows)]


class TileSheets:
    """The sprite sheets one page uses, each a CSS class ``s<n>`` holding its URL and how it is drawn (scale,
    border: :func:`~mergescope.report.sprites.drawn`), so a tile only states its offset."""

    def __init__(self, images: ChannelImages | None, page_dir: Path, tile: int = TILE):
        self.images, self.page_dir, self.tile, self.urls = images, page_dir, tile, {}
        self._drawn: dict[int, Drawn] = {}

    def rows(self, layer: str, channel: int, slugs: Sequence[str], only: Collection[str] | None = None) -> list[dict]:
        """Template rows of a channel's images: label and tiles (sheet class, offsets, image id, activation)."""
        if self.images is None:
            return []
        return [self.record(r) for r in self.images.rows(layer, channel, slugs, only)]

    def record(self, row: ImageRow) -> dict:
        cells = []
        for t, i, v in zip(row.tiles, row.ids, row.values):
            n = self.urls.setdefault(self.images.sheet_url(t, self.page_dir), len(self.urls))
            d = self._drawn[n] = drawn(t, self.tile)  # the sheet's scale, size and border are every tile's
            cells.append({"sheet": n, "x": d.x, "y": d.y, "id": i, "value": v})
        return {"label": row.label, "cells": cells}

    def css(self) -> list[dict]:
        """[{"n", "url", "width", "height", "border"}] for the page's ``<style>`` (border: CSS widths, "" if none)."""
        out = []
        for url, n in self.urls.items():
            d = self._drawn[n]
            out.append({"n": n, "url": url, "width": d.width, "height": d.height,
                        "border": " ".join(f"{b}px" for b in d.border) if any(d.border) else ""})
        return out


@staged("rendering")
def render_channel_pages(study_dir: str | os.PathLike, features_dir: str | os.PathLike,
                         channels: Iterable[tuple[str, int]] | None = None, *, images: ChannelImages | None = None,
                         tables: ChannelTables | None = None, layer_href: Mapping[str, str] | None = None,
                         ) -> dict[tuple[str, int], Path]:
    """Write ``study_dir/channels/<layer>/c<j>.html`` for the given channels (default: every channel of every layer
    of the feature study in ``features_dir``).

    Args:
        study_dir: the study folder (the overview is ``study_dir/report.html``).
        features_dir: the feature study's run folder (probe, ``compare.csv``, ``regression.csv``, feature pages).
        images, tables: already read :class:`ChannelImages` / :class:`ChannelTables` (read here when not given).
        layer_href: layer -> its page, relative to ``study_dir`` (linked from each channel page).

    Returns:
        (layer, channel) -> the page written.
    """
    study_dir, features_dir = Path(study_dir), Path(features_dir)
    images = images or (ChannelImages(features_dir) if (features_dir / "probe").is_dir() else None)
    tables = tables or ChannelTables.read(features_dir)
    if channels is None:
        layers = list(dict.fromkeys([*(images.layers if images else []), *tables.layers()]))
        channels = [(layer, c) for layer in layers
                    for c in (range(images.channels(layer)) if images and images.channels(layer) else
                              tables.channels(layer))]
    channels = list(channels)
    chosen = set(channels)
    template = _environment().get_template("channel.html")
    features_rel = Path(os.path.relpath(features_dir, study_dir)).as_posix()
    written = {}
    for layer, channel in channels:
        path = study_dir / channel_page(layer, channel)
        rel = Path(os.path.relpath(study_dir, path.parent)).as_posix()
        rows = tables.compare.get((layer, channel), [])
        sheets = TileSheets(images, path.parent, TILE)
        views = [{"slug": s, "href": f"{rel}/{features_rel}/{images.page_href(s, layer, channel)}"}
                 for s in ("pair", "many", "regress") if images and images.shows(s, layer, channel)]
        html = template.render(
            title=f"{layer} · channel {channel}", layer=layer, channel=channel, root=rel,
            prev=f"c{channel - 1}.html" if (layer, channel - 1) in chosen else None,
            next=f"c{channel + 1}.html" if (layer, channel + 1) in chosen else None,
            layer_href=f"{rel}/{layer_href[layer]}" if layer_href and layer in layer_href else None,
            views=views, tile=TILE,
            rows=sheets.rows(layer, channel, ("pair", "many")), regress_rows=sheets.rows(layer, channel, ("regress",)),
            sheets=sheets,
            models=[model_label(r["model"]) for r in rows], reference=rows[0]["reference"] if rows else "A",
            metrics=metric_cells(rows, tables.delta), categories=category_cells(rows),
            merged=next((r["merged_model"] for r in rows if r.get("merged_model")), ""),
            regression=sorted(tables.regression.get((layer, channel), []), key=lambda r: (r["m"], r["refit"])))
        written[layer, channel] = atomic_write_text(path, html)
    return written


__all__ = ["CHANNELS_DIR", "ChannelTables", "category_cells", "channel_page", "metric_cells", "render_channel_pages",
           "TileSheets"]
