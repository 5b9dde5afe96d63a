"""A feature page's data (report.feature_data) gives back what the view shows: every tile's image id, its value
(float16, or float32 beyond float16's range), its place on the sprite sheets, uint32 indices past 65,534 images."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from mergescope.report.feature_data import decode, encode_view, page_tiles, script_json
from mergescope.report.features import FeatureView
from mergescope.report.sprites import PER_SHEET, sprite_layout


def _dataset(n: int, classes: int = 3):
    return SimpleNamespace(classes=[f"class {c}" for c in range(classes)], targets=np.arange(n) % classes)


def _encode(view: FeatureView, n: int) -> dict:
    ids = sorted({int(i) for v in view.rows.values() for i in np.asarray(v).ravel() if i >= 0})
    tiles = sprite_layout(ids, "sprites", "p", "png", 56)
    sheets = [tiles[ids[i]].sheet for i in range(0, len(ids), PER_SHEET)]
    return encode_view(view, _dataset(n), ids, sheets, 56, 64), tiles


@pytest.mark.parametrize("images, scale", [(500, 1.0), (70_000, 1.0), (500, 1e5)])
def test_the_data_gives_back_every_shown_tile_value_and_place(images, scale):
    rng = np.random.default_rng(0)
    channels = 40 if images < 65_535 else images // 5  # the wide case: every image on the page once in row A
    rows = {"A": rng.permutation(images)[:channels * 5].reshape(channels, 5),
            "B <b>": rng.integers(0, images, (channels, 5))}
    rows["B <b>"][3, 2:] = -1  # fewer images for one channel
    values = {label: -np.sort(-rng.random((channels, 5)), axis=1) * scale for label in rows}
    order = [7, 3, 0, 39, 12] if channels == 40 else list(range(channels))
    view = FeatureView("pair", "t", "layer", rows, values, {"corr": rng.random(channels)}, order=order)
    record, tiles = _encode(view, images)
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
    assert record["info"]["corr"] == [pytest.approx(x, rel=1e-3) for x in np.asarray(record["info"]["corr"])]
    text = script_json(record)
    assert "<" not in text and ">" not in text and "B \\u003cb\\u003e" in text
