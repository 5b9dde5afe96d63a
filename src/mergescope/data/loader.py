"""Iterating over a dataset in batches that carry their image ids.

Datasets that are not in memory (ImageFolder trees of large images) are decoded and resized in DataLoader worker
processes — ``num_workers`` of them, by default the process's setting (:func:`set_workers`, the CLI's
``--workers``; initially one per CPU) — which hand their batches back in order, two batches prefetched per
worker, in pinned memory when CUDA is available (so the host-to-device copy of a pass overlaps). A dataset with a
``pixel_batch(ids)`` method (ImageFolder trees) is decoded a whole batch at a time and sent back as uint8 — or,
after :func:`set_decode_device` (the CLI's ``--decode device``), the workers send the files' bytes and the JPEGs
are decoded on the pass's device (:mod:`mergescope.data.device_decode`, nvJPEG on CUDA).
"""

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from mergescope.data.base import ImageDataset, as_ids
from mergescope.data.normalize import normalize_uint8
from mergescope.data.pool import cpu_count

_workers: int | None = None  # the process's default number of loader/decoder workers (None: one per CPU)
_decode_on: torch.device | None = None  # decode lazy trees' JPEGs on this device (None: in the workers, by Pillow)


def set_workers(workers: int | None) -> None:
    """The default number of worker processes for decoding (``iter_batches``, ImageFolder trees, JPEG packs) in
    this process; None: one per CPU; 0: decode in this process."""
    global _workers
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be at least 0, got {workers}")
    _workers = workers


def set_decode_device(device: torch.device | str | None) -> None:
    """Decode the JPEGs of datasets that are not in memory (ImageFolder trees opened lazily, e.g. ImageNet) on
    ``device`` — the pass's, e.g. ``"cuda"`` for nvJPEG — with :mod:`mergescope.data.device_decode`, the workers only
    reading the files; None (default): decoded and resized by Pillow in the workers. The CLI's ``--decode device``."""
    global _decode_on
    _decode_on = None if device is None else torch.device(device)


def decode_device() -> torch.device | None:
    """Where lazy trees' JPEGs are decoded (:func:`set_decode_device`); None: in the workers."""
    return _decode_on


def default_workers() -> int:
    """The number of decoding workers a call that does not choose gets (:func:`set_workers`)."""
    return cpu_count() if _workers is None else _workers


class Batch(NamedTuple):
    """A batch: ids int64 [B], x float32 [B, C, H, W], y int64 [B]."""

    ids: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor


class _WithIds(Dataset):
    """Wraps a dataset so item i is (i, x, y)."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return i, x, y


def batch_ids(n: int, batch_size: int, ids=None, shuffle: bool = False, seed: int = 0,
              drop_last: bool = False) -> list[torch.Tensor]:
    """The id chunks ``iter_batches`` walks through: ``ids`` (default all), optionally shuffled with ``seed``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = torch.arange(n) if ids is None else as_ids(ids, n)  # [M]
    if shuffle:
        order = order[torch.randperm(len(order), generator=torch.Generator().manual_seed(seed))]
    chunks = list(order.split(batch_size))
    if drop_last and chunks and len(chunks[-1]) < batch_size:
        chunks.pop()
    return chunks


def len_batches(dataset: ImageDataset, batch_size: int, ids=None, drop_last: bool = False) -> int:
    """How many batches ``iter_batches`` yields with these arguments (for progress bars)."""
    n = len(dataset) if ids is None else len(as_ids(ids, len(dataset)))
    return n // batch_size if drop_last else -(-n // batch_size)


class _BatchItems(Dataset):
    """Item j is batch j's ids followed by what ``dataset.<read>(ids)`` returns, as tensors, read in a worker:
    ``pixel_batch`` (uint8 pixels [B, H, W, C] and labels: a worker decodes a whole batch and hands back bytes, not
    floats, a quarter of the traffic between processes) or ``file_batch`` (the files' bytes, their lengths and the
    labels, decoded afterwards on the pass's device)."""

    def __init__(self, dataset: ImageDataset, chunks: list[torch.Tensor], read: str):
        self.dataset, self.chunks, self.read = dataset, chunks, read

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, j: int):
        return self.chunks[j], *(torch.as_tensor(part) for part in getattr(self.dataset, self.read)(self.chunks[j]))


def _generate(dataset: ImageDataset, chunks: list[torch.Tensor], num_workers: int | None) -> Iterator[Batch]:
    """Yield the batches for precomputed id chunks (in-memory fast path or a DataLoader)."""
    if getattr(dataset, "in_memory", False):
        for chunk in chunks:
            x, y = dataset.get_batch(chunk)
            yield Batch(chunk, x, y)
        return
    workers = min(default_workers() if num_workers is None else num_workers, len(chunks))
    cuda = torch.cuda.is_available()
    prefetch = 2 if workers > 0 else None
    if _decode_on is not None and hasattr(dataset, "device_batch"):  # bytes read in the workers, decoded there
        loader = DataLoader(_BatchItems(dataset, chunks, "file_batch"), batch_size=None, num_workers=workers,
                            prefetch_factor=prefetch)
        for ids_b, data, lengths, y in loader:
            yield Batch(ids_b, dataset.device_batch(ids_b, data, lengths, _decode_on), y)
        return
    if hasattr(dataset, "pixel_batch"):  # decoded per batch in the workers, normalized here
        loader = DataLoader(_BatchItems(dataset, chunks, "pixel_batch"), batch_size=None, num_workers=workers,
                            prefetch_factor=prefetch)
        for ids_b, pixels, y in loader:
            x = normalize_uint8(pixels.numpy(), dataset.mean, dataset.std)
            yield Batch(ids_b, x.pin_memory() if cuda else x, y)
        return
    loader = DataLoader(_WithIds(dataset), batch_sampler=[chunk.tolist() for chunk in chunks],
                        num_workers=workers, pin_memory=cuda, prefetch_factor=prefetch)
    for ids_b, x, y in loader:
        yield Batch(ids_b.to(torch.int64), x, y.to(torch.int64))


class Batches:
    """The batches of a pass: an iterable over precomputed id chunks that knows its length and slices lazily.

    ``batches[i:j]`` is the same pass restricted to batches i..j-1 (it loads only their images): a process
    group's ranks each walk one slice (:func:`mergescope.distributed.shard`).
    """

    def __init__(self, dataset: ImageDataset, chunks: list[torch.Tensor], num_workers: int | None = None):
        self.dataset, self.chunks, self.num_workers = dataset, chunks, num_workers

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: slice) -> "Batches":
        if not isinstance(index, slice):
            raise TypeError(f"Batches are sliced, not indexed (got {type(index).__name__})")
        return Batches(self.dataset, self.chunks[index], self.num_workers)

    def __iter__(self) -> Iterator[Batch]:
        return _generate(self.dataset, self.chunks, self.num_workers)


def iter_batches(dataset: ImageDataset, batch_size: int, ids=None, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, num_workers: int | None = None) -> Batches:
    """Batches of ``dataset`` with their ids.

    In-memory datasets are sliced with ``get_batch`` directly; others go through a torch DataLoader
    with ``num_workers`` processes. Both give the same batches in the same order.

    Args:
        dataset: any ImageDataset.
        batch_size: images per batch.
        ids: which ids to visit (default all), in this order unless shuffled.
        shuffle: permute the ids with a generator seeded by ``seed``.
        seed: shuffle seed.
        drop_last: skip a final short batch.
        num_workers: DataLoader workers that decode (ignored for in-memory datasets); default: the process's
            setting (:func:`set_workers`); 0: decode in this process.

    Returns:
        :class:`Batches` (iterable, sized, sliceable) of Batch(ids int64 [B], x float32 [B,C,H,W], y int64 [B]).
    """
    chunks = batch_ids(len(dataset), batch_size, ids, shuffle, seed, drop_last)  # checks arguments now
    return Batches(dataset, chunks, num_workers)
