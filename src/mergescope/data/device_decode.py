"""Decoding a batch's JPEG files where the models run: ``torchvision.io.decode_jpeg`` on the pass's device (nvJPEG,
batched, on CUDA), then the preset's geometry as tensor operations there (normalized by
:func:`mergescope.data.normalize.normalize_chw`).

The loader's workers then only read the files' bytes (:meth:`ImageFolderDataset.file_batch`), so a GPU pass of
small models is not bound by how fast the CPU cores decode (bench/decode.py measures both). Files that are not
JPEGs (PNG, WebP...) are decoded by Pillow on the CPU as in the default path and moved over.

Pixels are those of the default path to within rounding: on the CPU, torchvision's JPEG decoder gives Pillow's
pixels and its uint8 antialiased resize follows Pillow's, so images come out bit-identical or, for some sizes, with
a fraction of a percent of their pixels one level off (tests/test_device_decode.py). On CUDA, nvJPEG's inverse DCT
and the GPU resize are other implementations; their difference from Pillow's has not been measured yet
(``python bench/decode.py --device cuda`` prints it).
"""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from mergescope.data.decode import IMAGENET_CROP, IMAGENET_RESIZE, size_mismatch, to_rgb
from mergescope.errors import DatasetError

_JPEG_START = (0xFF, 0xD8)  # the SOI marker every JPEG file begins with


def is_jpeg(blob: torch.Tensor) -> bool:
    """Whether a file's bytes (uint8 1-D) begin like a JPEG."""
    return blob.numel() >= 2 and (int(blob[0]), int(blob[1])) == _JPEG_START


def _pillow(blob: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 [3, H, W] of a non-JPEG file's bytes, decoded by Pillow as the default path does."""
    try:
        with Image.open(io.BytesIO(blob.numpy().tobytes())) as img:
            return torch.from_numpy(np.array(to_rgb(img))).permute(2, 0, 1)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot decode image {name}: {exc}") from exc


def _imagenet(img: torch.Tensor) -> torch.Tensor:
    """:func:`mergescope.data.folder.imagenet_geometry` on a [3, H, W] tensor (antialiased bilinear, as Pillow's)."""
    return F.center_crop(F.resize(img, IMAGENET_RESIZE, antialias=True), [IMAGENET_CROP, IMAGENET_CROP])


def decode_batch(blobs: Sequence[torch.Tensor], names: Sequence[str], device: torch.device | str,
                 imagenet: bool, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [B, 3, H, W] on ``device`` of files' bytes: JPEGs decoded there in one batched call, other formats by
    Pillow; with ``imagenet`` the ImageNet geometry, else every image must already be ``size`` (H, W).

    Raises DatasetError naming the first file that cannot be decoded or has the wrong size.
    """
    device = torch.device(device)
    if not blobs:
        return torch.empty((0, 3, *size), dtype=torch.uint8, device=device)
    images: list[torch.Tensor | None] = [None] * len(blobs)
    jpegs = [i for i, b in enumerate(blobs) if is_jpeg(b)]
    if jpegs:
        try:
            decoded = decode_jpeg([blobs[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the whole call: find it (and decode the rest) one by one
            decoded = [_one_jpeg(blobs[i], names[i], device) for i in jpegs]
        for i, img in zip(jpegs, decoded):
            images[i] = img
    for i, blob in enumerate(blobs):
        if images[i] is None:
            images[i] = _pillow(blob, names[i]).to(device)
    if imagenet:
        return torch.stack([_imagenet(img) for img in images])
    for img, name in zip(images, names):
        if tuple(img.shape[1:]) != tuple(size):
            raise size_mismatch(name, tuple(img.shape[1:]), tuple(size))
    return torch.stack(images)


def _one_jpeg(blob: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    try:
        return decode_jpeg(blob, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:
        raise DatasetError(f"cannot decode image {name}: {str(exc).strip().splitlines()[0]}") from None
