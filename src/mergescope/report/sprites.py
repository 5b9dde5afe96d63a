"""Image tiles for feature views, packed into sprite sheets so a page with thousands of channels opens fast.

Tiles are decoded from the dataset by image id (:meth:`ImageDataset.image`). A page shows every image as a square
tile of ``size`` px; what the sheet stores depends on the images:

- images no larger than the tile (digits 8×8, CIFAR 32×32), all of one size: stored at their native size (lossless
  PNG, a few bytes each); the page draws the sheet scaled by the integer ``s = max(1, size // max(w, h))`` with
  ``image-rendering: pixelated`` and centres the ``s·w × s·h`` image in the tile with a white border (:func:`drawn`);
- large images (photos): Lanczos thumbnails of a centre crop, ``size`` px (JPEG);
- images of several sizes: every one drawn into a ``size`` px tile as :func:`tile_image` does (nearest-neighbour
  upscaling by ``s``, centred on white), the sheet shown unscaled.

All three look the same on the page: what :func:`tile_image` would draw (the digits' six sheets, grey, are a seventh
of the side they had as 56 px tiles: 0.33 → 0.08 MB, written in about a sixth of the time; bench/render_pages.py,
issue 14 item 2). Each sheet holds at most ``per_sheet`` cells in a square grid; ``<prefix>.sheets`` next to the
sheets records what they show and their cell size, so a page rendered again, or a channel page placing tiles on
them (:mod:`mergescope.report.channel_images`), needs no image decoded.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..runs.atomic import atomic_path, atomic_write_text

PER_SHEET = 1024  # tiles per sprite sheet
_LAYOUT = "cells/2"  # what a stamp's hash covers besides the ids: version 2 stores small images at native size


@dataclass(frozen=True)
class Tile:
    """Where one image sits on its sprite sheet (sheet pixels): the sheet's path, the cell's offset and size in it,
    and the sheet's size. A cell of ``size`` × ``size`` is a finished tile; a smaller one an image at native size."""

    sheet: str
    x: int
    y: int
    w: int
    h: int
    sheet_w: int
    sheet_h: int


@dataclass(frozen=True)
class Drawn:
    """How a page draws a :class:`Tile` as a ``size`` px square (CSS px): the sheet as a background of
    ``width`` × ``height`` at position ``(-x, -y)`` inside a white border ``(top, right, bottom, left)``."""

    scale: int
    x: int
    y: int
    width: int
    height: int
    border: tuple[int, int, int, int]


def drawn(tile: Tile, size: int) -> Drawn:
    """The geometry of :func:`tile_image` for a tile: scale ``s = max(1, size // max(w, h))``, the scaled cell
    centred (the odd pixel right and below). A finished tile (cell = ``size``) is shown as it is (s = 1, no border).
    ``templates/_feature_script.html`` computes the same in the browser."""
    s = max(1, size // max(tile.w, tile.h))
    left, top = (size - s * tile.w) // 2, (size - s * tile.h) // 2
    return Drawn(s, tile.x * s, tile.y * s, tile.sheet_w * s, tile.sheet_h * s,
                 (top, size - s * tile.w - left, size - s * tile.h - top, left))


def tile_image(img: Image.Image, size: int) -> Image.Image:
    """One square tile: nearest-neighbour upscaling for small images, Lanczos thumbnails for large ones."""
    img = img.convert("RGB")
    if max(img.size) <= size:
        scale = max(1, size // max(img.size))
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    else:
        img = thumbnail(img, size)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return canvas


def thumbnail(img: Image.Image, size: int) -> Image.Image:
    """A ``size`` px Lanczos thumbnail of the image's centre square."""
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.convert("RGB").crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)


def sheet_columns(count: int) -> int:
    """Columns of the square grid a sheet of ``count`` tiles is laid out in (row-major)."""
    return math.ceil(math.sqrt(count))


def sheet_size(count: int, w: int, h: int | None = None) -> tuple[int, int]:
    """Pixel (width, height) of a sheet of ``count`` cells of ``w`` × ``h`` px (default square; the grid of
    :func:`sprite_layout`)."""
    cols = sheet_columns(count)
    return cols * w, math.ceil(count / cols) * (w if h is None else h)


def sprite_layout(ids: Iterable[int], sheet_dir: str, prefix: str, ext: str, size: int = 64,
                  per_sheet: int = PER_SHEET, cell: tuple[int, int] | None = None) -> dict[int, Tile]:
    """Where :func:`write_sprites` puts every distinct image id (nothing drawn): sorted ids, ``per_sheet`` per
    sheet ``<sheet_dir>/<prefix>_<n>.<ext>``, each sheet a row-major square grid of ``cell`` (w, h) px cells
    (default ``size`` × ``size``: finished tiles)."""
    w, h = cell or (size, size)
    unique = sorted({int(i) for i in ids})
    tiles: dict[int, Tile] = {}
    for n, start in enumerate(range(0, len(unique), per_sheet)):
        chunk = unique[start:start + per_sheet]
        cols = sheet_columns(len(chunk))
        sw, sh = sheet_size(len(chunk), w, h)
        for j, image_id in enumerate(chunk):
            tiles[image_id] = Tile(f"{sheet_dir}/{prefix}_{n}.{ext}", (j % cols) * w, (j // cols) * h, w, h, sw, sh)
    return tiles


class TileCache:
    """What the sheets show of a dataset's images, each decoded (and thumbnailed) once while the cache lives (the
    sheets of every layer of a run show many of the same images); at most ``max_tiles`` are kept (oldest first)."""

    def __init__(self, dataset, size: int, max_tiles: int = 16384):
        self.dataset, self.size, self.max_tiles = dataset, size, max_tiles
        self._cells: dict[int, tuple[Image.Image, bool]] = {}

    def cell(self, image_id: int) -> tuple[Image.Image, bool]:
        """(what a sheet stores of the image, whether it is no larger than a tile): the image itself if it is
        (native size; grey stays grey, anything else RGB), else its ``size`` px thumbnail (RGB)."""
        got = self._cells.get(image_id)
        if got is None:
            img = self.dataset.image(image_id)
            small = max(img.size) <= self.size
            got = (img.convert("L" if img.mode in ("1", "L") else "RGB") if small else thumbnail(img, self.size), small)
            if len(self._cells) >= self.max_tiles:
                del self._cells[next(iter(self._cells))]
            self._cells[image_id] = got
        return got


def _hash(dataset, size: int, per_sheet: int, unique: list[int]) -> str:
    return hashlib.sha256(f"{_LAYOUT}|{dataset.fingerprint}|{size}|{per_sheet}|{unique}".encode()).hexdigest()


def _stamp(out_dir: Path, prefix: str) -> dict | None:
    """The stamp ``<prefix>.sheets`` as {"shows", "ext", "cell"}; None if absent or of an earlier version."""
    try:
        stamp = json.loads((Path(out_dir) / f"{prefix}.sheets").read_text(encoding="utf-8"))
        return {"shows": str(stamp["shows"]), "ext": str(stamp["ext"]),
                "cell": (int(stamp["cell"][0]), int(stamp["cell"][1]))}
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        return None


def sheet_geometry(out_dir: Path, prefix: str) -> tuple[str, tuple[int, int]] | None:
    """(extension, cell (w, h)) of the sheets ``out_dir/<prefix>_<n>.*`` as their stamp records them; None when
    there is no stamp of this version (sheets of an earlier mergescope hold finished tiles)."""
    stamp = _stamp(out_dir, prefix)
    return None if stamp is None else (stamp["ext"], stamp["cell"])


def write_sprites(dataset, ids: Iterable[int], out_dir: Path, prefix: str, size: int = 64,
                  per_sheet: int = PER_SHEET, tiles_of: TileCache | None = None) -> dict[int, Tile]:
    """Render every distinct image id once into sprite sheets ``out_dir/<prefix>_<n>.(png|jpg)``
    (layout: :func:`sprite_layout`, cells as the module docstring says); ``tiles_of``: a :class:`TileCache`
    shared by several calls.

    Sheets already drawn for the same ids of the same dataset (fingerprint) at the same size — a report rendered
    again, a comparison re-rendering the pages — are kept: ``<prefix>.sheets`` records what they show.

    Returns:
        image id -> :class:`Tile` (sheet path relative to the parent of ``out_dir``, cell in sheet pixels; a page
        draws it with :func:`drawn`).
    """
    unique = sorted({int(i) for i in ids})
    out_dir.mkdir(parents=True, exist_ok=True)
    shows, stamp = _hash(dataset, size, per_sheet, unique), out_dir / f"{prefix}.sheets"
    sheets = range(0, len(unique), per_sheet)
    kept = _stamp(out_dir, prefix)
    if (kept is not None and kept["shows"] == shows
            and all((out_dir / f"{prefix}_{n}.{kept['ext']}").is_file() for n, _ in enumerate(sheets))):
        return sprite_layout(unique, out_dir.name, prefix, kept["ext"], size, per_sheet, kept["cell"])
    tiles_of = tiles_of if tiles_of is not None else TileCache(dataset, size)
    small = tiles_of.cell(unique[0])[1] if unique else True  # the first image decides, as it always did
    ext, fmt = ("png", "PNG") if small else ("jpg", "JPEG")  # lossless for small images
    cell, mode = (size, size), "RGB"  # finished tiles, unless every image is small and of one size: stored as it is
    kinds = {(img.size, img.mode) for img, _ in map(tiles_of.cell, unique)} if small else set()
    if len({shape for shape, _ in kinds}) == 1:
        cell = next(iter(kinds))[0]
        mode = "L" if {m for _, m in kinds} == {"L"} else "RGB"  # a grey sheet: a third of the pixels' bytes
    tiles = sprite_layout(unique, out_dir.name, prefix, ext, size, per_sheet, cell)
    for n, start in enumerate(sheets):
        chunk = unique[start:start + per_sheet]
        first = tiles[chunk[0]]
        sheet = Image.new(mode, (first.sheet_w, first.sheet_h), "white")
        for image_id in chunk:
            img = tiles_of.cell(image_id)[0]
            sheet.paste(img if img.size == cell else tile_image(img, size), (tiles[image_id].x, tiles[image_id].y))
        with atomic_path(out_dir / f"{prefix}_{n}.{ext}") as tmp:
            # zlib level 1: CIFAR photo sheets as small as at the default level 6 in half the time (38 sheets:
            # 1.44 vs 3.04 s, 37.4 vs 38.0 MB); the digits' grey sheets 16% larger (0.125 vs 0.108 MB in all)
            sheet.save(tmp, format=fmt, **({"quality": 88} if fmt == "JPEG" else {"compress_level": 1}))
    atomic_write_text(stamp, json.dumps({"shows": shows, "ext": ext, "cell": list(cell)}))
    return tiles
