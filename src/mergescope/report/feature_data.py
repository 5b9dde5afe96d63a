"""The compact data of one feature page (``mergescope.features/2``): what the page's script draws in the browser.

A feature page holds no markup per tile: the view's top-k images are one JSON record inside the page, and a
little script (``templates/_feature_script.html``) draws one page of channels at a time from it. The record:

``order``     the channels shown, in display order (``n`` of them)
``images``    the distinct image ids on the page, sorted; a tile is an index into this list
``classes``, ``image_class``   class names and each image's class index (the tooltip's label)
``sheets``    per sprite sheet {"url", "cols", "rows", "w", "h"}: image ``images[u]`` is cell ``u % per_sheet`` of
              sheet ``u // per_sheet``, row-major in a grid of ``cols`` × ``rows`` cells of ``w`` × ``h`` sheet px
              (:func:`mergescope.report.sprites.sprite_layout`), drawn as a ``tile`` px square scaled by
              ``max(1, tile // max(w, h))`` and centred (:func:`mergescope.report.sprites.drawn`: a cell of ``tile``
              px is a finished tile, a smaller one an image at native size)
``rows``      row labels (``R``); ``k`` tiles per channel and row
``tiles``     little-endian uint16 (uint32 when there are 65,535 images or more) [R, n, k]; the dtype's maximum
              means no image
``values``    little-endian float16 [R, n, k] (float32 when a value is beyond float16's range); NaN: no value.
              float16 keeps 3 significant digits, what the tooltip shows.
``info``      metric name -> value per shown channel (4 significant digits; null: not defined)

``tiles`` and ``values`` are packed: their bytes split into byte planes (all first bytes, then all second bytes),
gzipped, base64 (the page unpacks them with the browser's ``DecompressionStream``). A 4,096-channel layer with
three rows of ten images is ~0.3 MB, against ~17 MB of markup before (bench/RESULTS.md, 2026-12-02).
"""
from __future__ import annotations

import base64
import gzip
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import MergescopeError
from .sprites import PER_SHEET, Tile, sheet_columns

FORMAT = "mergescope.features/2"  # /2: sheet cells of any size (w, h, rows)
DATA_ID = "feature-data"  # the id of the page's <script type="application/json"> element
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _pack(a: np.ndarray) -> str:
    """base64 of the gzip of ``a``'s bytes split into byte planes (every element's first byte, then every second
    byte...: the high bytes of small indices and the exponents of similar values compress well)."""
    planes = np.frombuffer(np.ascontiguousarray(a).tobytes(), np.uint8).reshape(-1, a.dtype.itemsize).T
    return base64.b64encode(gzip.compress(planes.tobytes(), compresslevel=9, mtime=0)).decode("ascii")


def _unpack(text: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    planes = np.frombuffer(gzip.decompress(base64.b64decode(text)), np.uint8).reshape(size, -1)
    return np.frombuffer(planes.T.tobytes(), dtype=dtype).reshape(shape)


def _short(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(f"{float(x):.4g}")


def encode_view(view, dataset, tiles: Mapping[int, Tile], tile: int, per_page: int,
                per_sheet: int = PER_SHEET) -> dict:
    """The record of ``view`` (a :class:`~mergescope.report.features.FeatureView`) whose images — every id of its
    rows among them — are on the sprite sheets as ``tiles`` (image id -> :class:`Tile`) say, ``per_sheet`` a sheet,
    as :func:`~mergescope.report.sprites.sprite_layout` puts them."""
    labels = list(view.rows)
    channels = int(next(iter(view.rows.values())).shape[0])
    order = [int(c) for c in view.order] if view.order is not None else list(range(channels))
    k = max(int(np.asarray(ids).shape[1]) for ids in view.rows.values())
    ids = np.full((len(labels), len(order), k), -1, dtype=np.int64)  # [R, n, k]
    values = np.full(ids.shape, np.nan, dtype=np.float64)  # [R, n, k]
    for r, label in enumerate(labels):
        rows = np.asarray(view.rows[label])[order]  # [n, k_r]
        ids[r, :, :rows.shape[1]] = rows
        if label in view.values:
            values[r, :, :rows.shape[1]] = np.asarray(view.values[label], dtype=np.float64)[order]
    values[ids < 0] = np.nan  # no image, no value
    images = np.asarray(sorted(tiles), dtype=np.int64)
    wide = len(images) >= np.iinfo(np.uint16).max
    tile_dtype = "<u4" if wide else "<u2"
    index = np.full(ids.shape, np.iinfo(tile_dtype).max, dtype=tile_dtype)  # [R, n, k] into images
    index[ids >= 0] = np.searchsorted(images, ids[ids >= 0])
    big = np.nanmax(np.abs(values), initial=0.0) > _FLOAT16_MAX
    value_dtype = "<f4" if big else "<f2"
    targets = np.asarray(dataset.targets)
    sheets = []
    for start in range(0, len(images), per_sheet):
        t, n = tiles[int(images[start])], len(images[start:start + per_sheet])
        cols = sheet_columns(n)
        sheets.append({"url": t.sheet, "cols": cols, "rows": math.ceil(n / cols), "w": t.w, "h": t.h})
    record = {"format": FORMAT, "title": view.title, "layer": view.layer, "note": view.note, "channels": channels,
              "order": order, "tile": tile, "per_page": per_page, "per_sheet": per_sheet,
              "images": images.tolist(), "classes": [str(c) for c in dataset.classes],
              "image_class": targets[images].astype(int).tolist(), "sheets": sheets,
              "rows": labels, "k": k, "tile_dtype": tile_dtype, "tiles": _pack(index),
              "value_dtype": value_dtype, "values": _pack(values.astype(value_dtype)),
              "info": {name: [_short(v[c]) for c in order] for name, v in view.channel_info.items()}}
    if page_tiles(record) != dict(tiles):  # what the page's script will draw is where the sheets hold the images
        raise MergescopeError("the tiles are not laid out on their sheets as sprite_layout puts them")
    return record


def script_json(record: dict) -> str:
    """``record`` as JSON that is safe inside a ``<script>`` element (no ``<``, ``>`` or ``&`` in it)."""
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_DATA = re.compile(rf'<script type="application/json" id="{DATA_ID}">(.*?)</script>', re.S)


def read_page_data(path: str | Path) -> dict:
    """The record inside a feature page written by :func:`~mergescope.report.features.render_feature_pages`."""
    found = _DATA.search(Path(path).read_text(encoding="utf-8"))
    if found is None:
        raise MergescopeError(f"{path} holds no feature data (a page of another mergescope version?)")
    record = json.loads(found.group(1))
    if record.get("format") != FORMAT:
        raise MergescopeError(f"{path} has feature data {record.get('format')!r}; this mergescope reads {FORMAT!r}")
    return record


def decode(record: dict) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per row label, the image ids (int64 [n, k], -1: none) and values (float64 [n, k], NaN: none) of the
    channels of ``record["order"]``, in that order — what the page shows."""
    r, n, k = len(record["rows"]), len(record["order"]), record["k"]
    tiles = _unpack(record["tiles"], record["tile_dtype"], (r, n, k))
    images = np.asarray(record["images"], dtype=np.int64)
    none = tiles == np.iinfo(record["tile_dtype"]).max
    ids = np.where(none, -1, images[np.where(none, 0, tiles)] if len(images) else -1)
    values = _unpack(record["values"], record["value_dtype"], (r, n, k)).astype(np.float64)
    return ({label: ids[i] for i, label in enumerate(record["rows"])},
            {label: values[i] for i, label in enumerate(record["rows"])})


def page_tiles(record: dict) -> dict[int, Tile]:
    """image id -> where the page draws it from (sheet URL relative to the page, the cell in sheet pixels)."""
    out, per = {}, record["per_sheet"]
    for u, image in enumerate(record["images"]):
        sheet = record["sheets"][u // per]
        j, w, h = u % per, sheet["w"], sheet["h"]
        out[int(image)] = Tile(sheet["url"], (j % sheet["cols"]) * w, (j // sheet["cols"]) * h, w, h,
                               sheet["cols"] * w, sheet["rows"] * h)
    return out


__all__ = ["DATA_ID", "FORMAT", "decode", "encode_view", "page_tiles", "read_page_data", "script_json"]
