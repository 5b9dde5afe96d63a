"""Decoding image files and JPEG bytes with Pillow into RGB pixels (runs in worker processes too)."""

import io
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from mergescope.errors import DatasetError

Geometry = Callable[[Image.Image], Image.Image]
IMAGENET_RESIZE, IMAGENET_CROP = 256, 224  # the ImageNet evaluation view: short side resized to 256, centre crop 224


def to_rgb(img: Image.Image) -> Image.Image:
    """A new RGB copy of ``img`` whatever its mode.

    Palette images with transparency go through RGBA; alpha is dropped (as torchvision's loader does);
    16-bit grey (``I;16*``) is scaled to 8 bit; CMYK, L, LA, 1, YCbCr... use Pillow's conversion.
    """
    if img.mode.startswith("I;16"):
        grey = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)  # [H,W]
        img = Image.fromarray(grey)  # mode L
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Read one image file and return it as RGB (file closed on return)."""
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot decode image {path}: {exc}") from exc


def image_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file, read from its header only."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except OSError as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def image_sizes(paths: Sequence[str]) -> np.ndarray:
    """Header sizes of several files. Returns int64 [n, 2] of (height, width)."""
    return np.array([image_size(p) for p in paths], dtype=np.int64).reshape(-1, 2)


def size_mismatch(name: str, got: tuple[int, int], want: tuple[int, int]) -> DatasetError:
    """The error for an image whose (height, width) differs from the one all images must share."""
    return DatasetError(f"images must share one size: {name} is {got[1]}x{got[0]}, expected {want[1]}x{want[0]}")


def _stack(arrays: list[np.ndarray], names: Sequence[str], size: tuple[int, int] | None) -> np.ndarray:
    """Stack HWC arrays that must all be ``size`` (default: the first one's); the first misfit raises."""
    want = tuple(arrays[0].shape[:2]) if size is None else tuple(size)
    for arr, name in zip(arrays, names):
        if arr.shape[:2] != want:
            raise size_mismatch(name, arr.shape[:2], want)
    return np.stack(arrays)


def decode_files(paths: Sequence[str], geometry: Geometry | None = None,
                 size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode files to RGB and apply an optional PIL→PIL ``geometry``.

    Args:
        paths: image files.
        geometry: e.g. resize + crop; None keeps the image as decoded.
        size: (H, W) every result must have (default: the first one's); the first misfit raises DatasetError.

    Returns:
        uint8 [n, H, W, 3].
    """
    arrays = []
    for path in paths:
        img = load_rgb(path)
        arrays.append(np.asarray(geometry(img) if geometry is not None else img))  # [H,W,3]
    return _stack(arrays, paths, size)


def decode_jpeg_chunk(blob: bytes, offsets: np.ndarray, first_index: int = 0,
                      size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode concatenated encoded images to RGB; image j is ``blob[offsets[j]:offsets[j+1]]``.

    Args:
        blob: the encoded files back to back.
        offsets: int64 [k+1], relative to ``blob``.
        first_index: dataset index of image 0, used in error messages.
        size: (H, W) every image must have (default: the first one's); the first misfit raises DatasetError.

    Returns:
        uint8 [k, H, W, 3].
    """
    arrays = []
    for j in range(len(offsets) - 1):
        try:
            with Image.open(io.BytesIO(blob[offsets[j]:offsets[j + 1]])) as img:
                arrays.append(np.asarray(to_rgb(img)))  # [H,W,3]
        except OSError as exc:
            raise DatasetError(f"cannot decode packed image {first_index + j}: {exc}") from exc
    return _stack(arrays, [f"packed image {first_index + j}" for j in range(len(arrays))], size)
