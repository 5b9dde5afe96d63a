"""Embeddings cached by image id: an image in many channels' top-k sets is embedded once."""
from __future__ import annotations

import torch

from ..data.base import ImageDataset, as_ids
from ..errors import MergescopeError
from .base import ImageEmbedder


class EmbeddingCache:
    """Embeds dataset images by id on demand and remembers them.

    One cache serves one dataset (ids mean images of that dataset); a different dataset object is accepted only
    if its fingerprint is the same.

    Attributes:
        embedder: the :class:`ImageEmbedder` used.
        computed: how many images have been embedded so far (each distinct id once).
        requested: how many ids :meth:`get` was asked for in total (repeats included).
    """

    def __init__(self, embedder: ImageEmbedder, *, batch_size: int = 256):
        self.embedder = embedder
        self.batch_size = batch_size
        self.computed = 0
        self.requested = 0
        self._rows: dict[int, torch.Tensor] = {}
        self._dataset: ImageDataset | None = None

    @property
    def name(self) -> str:
        return self.embedder.name

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, ids, dataset: ImageDataset) -> torch.Tensor:
        """Embeddings of ``dataset`` images ``ids`` (int [m]), embedding only those not cached yet.

        Returns:
            float32 [m, d], row i the L2-normalised embedding of image ``ids[i]``.
        """
        self._bind(dataset)
        ids = as_ids(ids, len(dataset))
        wanted = ids.tolist()
        self.requested += len(wanted)
        missing = list(dict.fromkeys(i for i in wanted if i not in self._rows))  # distinct, first-seen order
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            emb = self.embedder.embed([dataset.image(i) for i in chunk])  # [B,d]
            if emb.shape[0] != len(chunk):
                raise MergescopeError(f"{self.name} returned {emb.shape[0]} embeddings for {len(chunk)} images")
            self._rows.update(zip(chunk, emb.unbind(0)))
            self.computed += len(chunk)
        if not wanted:
            return torch.empty(0, 0)
        return torch.stack([self._rows[i] for i in wanted])

    def _bind(self, dataset: ImageDataset) -> None:
        if self._dataset is None:
            self._dataset = dataset
        elif dataset is not self._dataset and dataset.fingerprint != self._dataset.fingerprint:
            raise MergescopeError(f"this EmbeddingCache holds images of {self._dataset!r}, not of {dataset!r}; "
                                  "use one cache per dataset")
