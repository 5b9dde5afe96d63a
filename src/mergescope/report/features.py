"""Feature-visualization pages: for each channel, the top-k dataset images of several models side by side.

A :class:`FeatureView` is data — per row (a model: A, B before permutation, B aligned, the merged model…) the
top-k image ids of every channel of one layer, with channel ``c`` of every row meant to be the same unit —
and :func:`render_feature_pages` turns it into paginated HTML pages whose image tiles live in sprite sheets.
:func:`view_record` stores a view as JSON (only the channels it shows) for re-rendering without a model.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runs.atomic import atomic_write_text
from .html import _environment
from .sprites import write_sprites


TILE = 56  # px of one image tile on the feature pages (and in their sprite sheets)


@dataclass
class FeatureView:
    """The top-k images of one layer's channels in several models (rows), for one page family."""

    slug: str  # file-name prefix, e.g. "pair" or "many"
    title: str  # e.g. "A, B and their merge"
    layer: str  # canonical layer name
    rows: Mapping[str, np.ndarray]  # row label -> top-k ids, int [C, k]; channel c of every row is one unit
    values: Mapping[str, np.ndarray] = field(default_factory=dict)  # row label -> top-k activations [C, k]
    channel_info: Mapping[str, np.ndarray] = field(default_factory=dict)  # metric name -> value per channel [C]
    #                                                                      (None: not defined, shown as a dash)
    note: str = ""  # one sentence shown under the title
    order: Sequence[int] | None = None  # channel display order (default 0..C-1)


def _page_name(view: FeatureView, page: int) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in view.layer)
    return f"{view.slug}_{safe}" + (f"_p{page + 1}" if page else "") + ".html"


def channel_href(slug: str, layer: str, channel: int, per_page: int = 64) -> str:
    """Link (relative to ``features/``) to channel ``channel`` of a view's page, in default channel order."""
    view = FeatureView(slug, "", layer, {})
    return f"{_page_name(view, channel // per_page)}#c{channel}"


def render_feature_pages(run_dir: str | Path, dataset, views: Sequence[FeatureView], tile: int = TILE,
                         per_page: int = 64) -> list[dict]:
    """Write ``run_dir/features/*.html`` (+ sprite sheets) for every view.

    Returns:
        One index entry per view: {"slug", "title", "layer", "channels", "href"} (href relative to run_dir).
    """
    run_dir = Path(run_dir)
    out = run_dir / "features"
    env = _environment()
    template = env.get_template("features.html")
    index = []
    for view in views:
        labels = list(view.rows)
        channels = int(next(iter(view.rows.values())).shape[0])
        all_ids = np.concatenate([np.asarray(ids).ravel() for ids in view.rows.values()])
        tiles = write_sprites(dataset, all_ids[all_ids >= 0], out / "sprites",
                              _page_name(view, 0)[:-5], size=tile)
        order = list(view.order) if view.order is not None else list(range(channels))
        pages = [order[i:i + per_page] for i in range(0, len(order), per_page)]
        for p, chans in enumerate(pages):
            blocks = []
            for c in chans:
                rows = []
                for label in labels:
                    ids = np.asarray(view.rows[label][c])
                    vals = np.asarray(view.values[label][c]) if label in view.values else None
                    cells = [{"tile": tiles[int(i)], "id": int(i),
                              "value": None if vals is None else float(vals[j]),
                              "label": dataset.classes[int(dataset.targets[int(i)])]}
                             for j, i in enumerate(ids) if i >= 0]
                    rows.append({"label": label, "cells": cells})
                info = {name: None if v[c] is None else float(v[c]) for name, v in view.channel_info.items()}
                blocks.append({"channel": c, "rows": rows, "info": info})
            html = template.render(
                view=view, blocks=blocks, tile=tile, page=p, pages=len(pages), channels=channels,
                page_names=[_page_name(view, i) for i in range(len(pages))],
                title=f"{view.title} — {view.layer}",
            )
            atomic_write_text(out / _page_name(view, p), html)
        index.append({"slug": view.slug, "title": view.title, "layer": view.layer, "channels": channels,
                      "href": f"features/{_page_name(view, 0)}"})
    return index


def view_record(view: FeatureView) -> dict:
    """A JSON-able record of ``view`` holding only the channels it shows (``order``, default all), so pages can be
    re-rendered without the computation that made it (:func:`view_from_record`)."""
    channels = int(next(iter(view.rows.values())).shape[0])
    chans = [int(c) for c in view.order] if view.order is not None else list(range(channels))

    def floats(v) -> list:
        return [None if x is None or not np.isfinite(x) else float(x) for x in v]

    return {"slug": view.slug, "title": view.title, "layer": view.layer, "note": view.note, "channels": channels,
            "order": chans,
            "rows": {label: np.asarray(ids)[chans].tolist() for label, ids in view.rows.items()},
            "values": {label: [floats(r) for r in np.asarray(v, dtype=float)[chans]]
                       for label, v in view.values.items()},
            "channel_info": {name: floats(v[c] for c in chans) for name, v in view.channel_info.items()}}


def view_from_record(record: Mapping) -> FeatureView:
    """The view of a :func:`view_record`: the channels it does not show have no images (id -1, no values)."""
    channels, chans = int(record["channels"]), list(record["order"])
    k = max((len(r) for ids in record["rows"].values() for r in ids), default=0)

    def table(lists, fill, dtype) -> np.ndarray:
        out = np.full((channels, k), fill, dtype=dtype)  # [C, k]
        for c, row in zip(chans, lists):
            out[c, :len(row)] = [fill if x is None else x for x in row]
        return out

    info = {}
    for name, v in record["channel_info"].items():
        info[name] = [None] * channels
        for c, x in zip(chans, v):
            info[name][c] = x
    return FeatureView(record["slug"], record["title"], record["layer"],
                       {label: table(ids, -1, np.int64) for label, ids in record["rows"].items()},
                       {label: table(v, np.nan, np.float64) for label, v in record["values"].items()},
                       info, record.get("note", ""), chans)


def feature_index_html(index: Sequence[dict]) -> str:
    """An HTML fragment listing the feature pages (for the main report's sections)."""
    return _environment().get_template("_feature_index.html").render(index=index)
