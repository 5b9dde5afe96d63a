"""A feature page's data (report.feature_data) gives back what the view shows: every tile's image id, its value
(float16, or float32 beyond float16's range), its place on the sprite sheets, uint32 indices past 65,534 images."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mergescope.report.feature_data import decode, encode_view, page_tiles, script_json
from mergescope.report.features import FeatureView
from mergescope.report.sprites import PER_SHEET, sprite_layout


def _dataset(n: int, classes: int = 3):
    return SimpleNamespace(classes=[f"class {c}" for c in range(classes)], targets=np.arange(n) % classes)


def _encode(view: FeatureView, n: int, cell: tuple[int, int] | None = None) -> dict:
    ids = sorted({int(i) for v in view.rows.values() for i in np.asarray(v).ravel() if i >= 0})
    tiles = sprite_layout(ids, "sprites", "p", "png", 56, PER_SHEET, cell)
    return encode_view(view, _dataset(n), tiles, 56, 64), tiles


@pytest.mark.parametrize("images, scale, cell", [(500, 1.0, None), (70_000, 1.0, (8, 8)), (500, 1e5, (12, 20))])
def test_the_data_gives_back_every_shown_tile_value_and_place(images, scale, cell):
    """Finished 56 px tiles, digits-sized 8×8 cells (70,000 images: 69 sheets) and non-square 12×20 cells."""
    rng = np.random.default_rng(0)
    channels = 40 if images < 65_535 else images // 5  # the wide case: every image on the page once in row A
    rows = {"A": rng.permutation(images)[:channels * 5].reshape(channels, 5),
            "B <b>": rng.integers(0, images, (channels, 5))}
    rows["B <b>"][3, 2:] = -1  # fewer images for one channel
    values = {label: -np.sort(-rng.random((channels, 5)), axis=1) * scale for label in rows}
    order = [7, 3, 0, 39, 12] if channels == 40 else list(range(channels))
    view = FeatureView("pair", "t", "layer", rows, values, {"corr": rng.random(channels)}, order=order)
    record, tiles = _encode(view, images, cell)
    assert record["tile_dtype"] == ("<u4" if images >= 65_535 else "<u2")
    assert record["value_dtype"] == ("<f4" if scale > 1 else "<f2")
    ids, vals = decode(record)
    assert list(ids) == ["A", "B <b>"] and record["order"] == order
    for label in rows:
        want = np.asarray(rows[label])[order]
        assert np.array_equal(ids[label], want), label
        shown = want >= 0
        got, exact = vals[label][shown], values[label][order][shown]
        np.testing.assert_allclose(got, exact, rtol=2 ** -11 if scale == 1 else 1e-7, atol=2 ** -24)  # subnormals
        assert np.isnan(vals[label][~shown]).all()
    where = page_tiles(record)
    assert where == {i: tiles[i] for i in where} and set(where) == set(tiles)
    w, h = cell or (56, 56)
    for t in where.values():  # every cell inside its sheet, on the grid of its size
        assert (t.w, t.h) == (w, h) and t.x % w == 0 and t.y % h == 0
        assert t.x + w <= t.sheet_w and t.y + h <= t.sheet_h
    assert {(s["w"], s["h"]) for s in record["sheets"]} == {(w, h)}
    assert record["info"]["corr"] == [pytest.approx(x, rel=1e-3) for x in np.asarray(record["info"]["corr"])]
    text = script_json(record)
    assert "<" not in text and ">" not in text and "B \\u003cb\\u003e" in text


def test_tiles_not_where_the_layout_puts_them_are_refused():
    from dataclasses import replace

    from mergescope.errors import MergescopeError

    rows = {"A": np.arange(20).reshape(4, 5)}
    tiles = sprite_layout(range(20), "sprites", "p", "png", 56, PER_SHEET, (8, 8))
    tiles[3] = replace(tiles[3], x=tiles[3].x + 8)
    with pytest.raises(MergescopeError, match="not laid out"):
        encode_view(FeatureView("pair", "t", "layer", rows), _dataset(20), tiles, 56, 64)


class _Images:
    """A dataset of given images (what write_sprites reads: image(i), fingerprint)."""

    def __init__(self, images, name="fake"):
        self.images, self.fingerprint = images, f"{name}-{len(images)}"

    def image(self, i):
        return self.images[i]


def _pictures(sizes, mode="RGB", seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = [Image.fromarray(rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8), mode)
           for w, h in sizes]
    return [im if max(im.size) <= 56 else im.resize((6, 6)).resize(im.size, Image.BICUBIC) for im in out]  # photos


def _as_the_browser_draws(tile, sheet, size: int):
    """The ``size`` px square a page shows for ``tile``: the sheet scaled (nearest neighbour, CSS
    ``image-rendering: pixelated``) by the scale of sprites.drawn, the tile's window of it inside the white border."""
    from PIL import Image

    from mergescope.report.sprites import drawn

    d = drawn(tile, size)
    top, right, bottom, left = d.border
    scaled = sheet.resize((d.width, d.height), Image.NEAREST)
    out = Image.new("RGB", (size, size), (255, 255, 255))
    out.paste(scaled.crop((d.x, d.y, d.x + size - left - right, d.y + size - top - bottom)), (left, top))
    return out


@pytest.mark.parametrize("case, sizes, mode, cell, ext", [
    ("digits 8×8", [(8, 8)] * 40, "L", (8, 8), "png"),
    ("CIFAR 32×32 (scale 1, 12 px border)", [(32, 32)] * 10, "RGB", (32, 32), "png"),
    ("non-square 12×20 (scale 2, borders)", [(12, 20)] * 7, "RGB", (12, 20), "png"),
    ("55×55 (border right and below only)", [(55, 55)] * 5, "RGB", (55, 55), "png"),
    ("small of two sizes: finished tiles", [(8, 8), (16, 16)] * 5, "RGB", (56, 56), "png"),
    ("photos: Lanczos thumbnails", [(100, 80)] * 6, "RGB", (56, 56), "jpg"),
])
def test_every_tile_a_page_draws_is_the_tile_image_of_its_image(tmp_path, case, sizes, mode, cell, ext):
    """Oracle: what the browser shows of a sheet's cell (sprites.drawn's scale and border applied to the stored sheet)
    is :func:`tile_image` of the image — pixel for pixel where the sheet is PNG; small images are stored at their
    native size (a 8×8 digit is 64 px of the sheet, not 56²)."""
    from PIL import Image

    from mergescope.report.sprites import tile_image, write_sprites

    data = _Images(_pictures(sizes, mode))
    ids = list(range(len(sizes)))[::-1]
    tiles = write_sprites(data, ids, tmp_path / "sprites", "p", size=56, per_sheet=16)
    assert sorted(tiles) == sorted(ids) and {(t.w, t.h) for t in tiles.values()} == {cell}
    assert {Path(t.sheet).suffix for t in tiles.values()} == {f".{ext}"}
    sheets = {}
    for i, t in tiles.items():
        if t.sheet not in sheets:
            sheets[t.sheet] = Image.open(tmp_path / t.sheet).convert("RGB")
            assert sheets[t.sheet].size == (t.sheet_w, t.sheet_h)
        got = np.asarray(_as_the_browser_draws(t, sheets[t.sheet], 56), dtype=int)
        want = np.asarray(tile_image(data.image(i), 56), dtype=int)
        if ext == "png":
            assert np.array_equal(got, want), (case, i)
        else:  # JPEG at quality 88
            assert np.abs(got - want).mean() < 6, (case, i)


def test_sheets_already_drawn_are_kept_and_an_earlier_versions_are_redrawn(tmp_path):
    from mergescope.report.sprites import sheet_geometry, write_sprites

    data = _Images(_pictures([(8, 8)] * 30, "L"))
    out = tmp_path / "sprites"
    first = write_sprites(data, range(30), out, "p", size=56)
    sheet = out / "p_0.png"
    assert sheet_geometry(out, "p") == ("png", (8, 8))
    when = sheet.stat().st_mtime_ns  # changes when the sheet is drawn again
    assert write_sprites(data, range(30), out, "p", size=56) == first and sheet.stat().st_mtime_ns == when
    (out / "p.sheets").write_text("0" * 64)  # the stamp of an earlier mergescope: sheets of 56 px tiles
    assert sheet_geometry(out, "p") is None
    assert write_sprites(data, range(30), out, "p", size=56) == first and sheet.stat().st_mtime_ns != when
    assert write_sprites(data, range(29), out, "p", size=56) != first  # other ids: other sheets
