"""Feature-visualization pages: for each channel, the top-k dataset images of several models side by side.

A :class:`FeatureView` is data — per row (a model: A, B before permutation, B aligned, the merged model…) the
top-k image ids of every channel of one layer, with channel ``c`` of every row meant to be the same unit —
and :func:`render_feature_pages` turns it into one page per view whose script draws the channels from compact data
(:mod:`mergescope.report.feature_data`), the image tiles living in sprite sheets.
:func:`view_record` stores a view as JSON (only the channels it shows) for re-rendering without a model.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from markupsafe import Markup

from ..runs.atomic import atomic_write_text
from ..timing import staged
from .feature_data import DATA_ID, encode_view, script_json
from .html import _environment
from .sprites import TileCache, write_sprites


TILE = 56  # px of one image tile on the feature pages (a sheet holds it at this size, or smaller images as they are)


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


def _page_name(view: FeatureView) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in view.layer)
    return f"{view.slug}_{safe}.html"


def channel_href(slug: str, layer: str, channel: int) -> str:
    """Link (relative to ``features/``) to channel ``channel`` of a view's page (its script shows that channel)."""
    return f"{_page_name(FeatureView(slug, '', layer, {}))}#c{channel}"


@staged("rendering")
def render_feature_pages(run_dir: str | Path, dataset, views: Sequence[FeatureView], tile: int = TILE,
                         per_page: int = 64) -> list[dict]:
    """Write ``run_dir/features/<slug>_<layer>.html`` (+ sprite sheets) for every view.

    One page per view: the view's top-k images as compact data (:mod:`mergescope.report.feature_data`) that the
    page's script draws ``per_page`` channels at a time, so a page's size grows by a few bytes per image shown,
    not by its markup. Every image is decoded (and thumbnailed) once for all views (:class:`TileCache`).

    Returns:
        One index entry per view: {"slug", "title", "layer", "channels", "href"} (href relative to run_dir).
    """
    run_dir = Path(run_dir)
    out = run_dir / "features"
    template = _environment().get_template("features.html")
    tiles_of = TileCache(dataset, tile)
    index = []
    for view in views:
        name = _page_name(view)
        all_ids = np.concatenate([np.asarray(ids).ravel() for ids in view.rows.values()])
        tiles = write_sprites(dataset, all_ids[all_ids >= 0], out / "sprites", name[:-5], size=tile,
                              tiles_of=tiles_of)
        record = encode_view(view, dataset, tiles, tile, per_page)
        html = template.render(view=view, tile=tile, channels=record["channels"], shown=len(record["order"]),
                               data=Markup(script_json(record)), data_id=DATA_ID,
                               title=f"{view.title} — {view.layer}")
        atomic_write_text(out / name, html)
        index.append({"slug": view.slug, "title": view.title, "layer": view.layer, "channels": record["channels"],
                      "href": f"features/{name}"})
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
