"""Streaming per-channel top-k: the k images that activate each channel most, from a stream of batches.

Order: activation descending, ties broken by the smaller image id. Every (value, id) pair is encoded as one
int64 *key* whose integer order is exactly that order — the upper 32 bits hold the float32 value's bits mapped
to an order-preserving signed integer (``-0.0`` is folded into ``+0.0`` first so the two zeros tie), the lower
32 bits hold ``2**32 - 1 - id``. One ``torch.topk`` over keys is then an exact, deterministic selection: the
result depends only on the set of (id, value) pairs seen — not on batch order, batch size or how the stream
was sharded — and two partial results merge exactly. Ids must be unique within a stream and lie in
``0 .. 2**32 - 1``.
"""
from __future__ import annotations

import torch

from ..errors import NumericsError

_ID_SPAN = 1 << 32
_LOW_BITS = _ID_SPAN - 1
_MANTISSA_AND_EXP = 0x7FFFFFFF
EMPTY_KEY = torch.iinfo(torch.int64).min  # below every encoded key (padding when gathering shards)


def encode_keys(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float [..., B] activations and int64 ids ([B] or [..., B]) -> int64 [..., B] keys.

    Keys compare like (value descending, id ascending) pairs: a larger key is a larger value, or the same
    value with a smaller id.
    """
    bits = (values.float() + 0.0).view(torch.int32)  # -0.0 + 0.0 == +0.0: both zeros must tie
    order = bits >> 31  # -1 (all ones) for negative floats, else 0: one new int32 tensor, then in place
    order &= _MANTISSA_AND_EXP
    order ^= bits  # negative floats: magnitude bits flipped, reversing their order
    keys = order.to(torch.int64)
    keys <<= 32
    keys |= _LOW_BITS - ids.to(device=values.device, dtype=torch.int64)
    return keys


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys -> (float32 values, int64 ids), the exact inverse of :func:`encode_keys`."""
    ids = _LOW_BITS - (keys & _LOW_BITS)
    bits = keys >> 32  # arithmetic shift: floor(key / 2**32)
    bits = torch.where(bits < 0, bits ^ _MANTISSA_AND_EXP, bits)
    return bits.to(torch.int32).view(torch.float32), ids


class StreamingTopK:
    """The top-k (value, image id) pairs of each of ``channels`` channels over a stream of batches.

    Memory is O(channels · k) whatever the stream length. Results are identical for any batch order, batch
    size or sharding (ties go to the smaller id), and :meth:`merge` combines shards exactly.

    Example:
        >>> topk = StreamingTopK(channels=3, k=2)
        >>> topk.update(torch.tensor([[1.0, 0.0, 5.0], [2.0, 0.0, 5.0]]), ids=torch.tensor([7, 3]))
        >>> topk.ids.tolist()  # channel 1 and 2 tie: the smaller id comes first
        [[3, 7], [3, 7], [3, 7]]
    """

    def __init__(self, channels: int, k: int = 10, device: torch.device | str | None = None, name: str = ""):
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        self.channels, self.k, self.name = int(channels), int(k), name
        self.keys = torch.empty(self.channels, 0, dtype=torch.int64, device=device)  # (C, m), m <= k, sorted
        self.count = 0  # images seen

    def update(self, values: torch.Tensor, ids: torch.Tensor, check: bool = True) -> None:
        """Add a batch: ``values`` float [B, C] (one activation per image and channel), ``ids`` int64 [B].

        ``check=False`` skips the NaN/Inf test (for callers that test a whole batch of layers at once).
        """
        if values.ndim != 2 or values.shape[1] != self.channels:
            raise ValueError(f"{self.name or 'top-k'}: expected values of shape [B, {self.channels}], "
                             f"got {list(values.shape)}")
        ids = torch.as_tensor(ids, dtype=torch.int64)
        if ids.shape != values.shape[:1]:
            raise ValueError(f"{self.name or 'top-k'}: {values.shape[0]} rows of values but {ids.numel()} ids")
        if ids.numel() and ids.device.type == "cpu" and (int(ids.min()) < 0 or int(ids.max()) > _LOW_BITS):
            raise ValueError(f"image ids must lie in 0..2**32-1, got {int(ids.min())}..{int(ids.max())}")
        if check and not bool(torch.isfinite(values).all()):
            raise NumericsError(f"NaN/Inf activations in {self.name or 'the top-k stream'}")
        self._absorb(encode_keys(values.T, ids))  # (C, B)
        self.count += int(values.shape[0])

    def merge(self, other: StreamingTopK) -> None:
        """Absorb another shard's top-k (disjoint image ids); same result as one stream over both."""
        if (other.channels, other.k) != (self.channels, self.k):
            raise ValueError(f"cannot merge top-k of {other.channels} channels, k={other.k} into "
                             f"{self.channels} channels, k={self.k}")
        self._absorb(other.keys)
        self.count += other.count

    def _absorb(self, keys: torch.Tensor) -> None:
        pool = torch.cat([self.keys, keys.to(self.keys.device)], dim=1)  # (C, m + B)
        self.keys = pool.topk(min(self.k, pool.shape[1]), dim=1).values  # sorted, largest first

    @property
    def values(self) -> torch.Tensor:
        """float32 [C, m]: each channel's largest activations, descending (m = min(k, images seen))."""
        return decode_keys(self.keys)[0]

    @property
    def ids(self) -> torch.Tensor:
        """int64 [C, m]: the image ids belonging to :attr:`values`."""
        return decode_keys(self.keys)[1]

    @classmethod
    def from_arrays(cls, values: torch.Tensor, ids: torch.Tensor, k: int, count: int, name: str = "",
                    device: torch.device | str | None = None) -> StreamingTopK:
        """Rebuild from saved ``values`` float32 [C, m] and ``ids`` int64 [C, m] (as :attr:`values`/:attr:`ids`)."""
        if values.shape != ids.shape or values.ndim != 2 or values.shape[1] > k:
            raise ValueError(f"{name or 'top-k'}: values {list(values.shape)} and ids {list(ids.shape)} "
                             f"do not form a saved top-{k}")
        topk = cls(values.shape[0], k, device, name)
        topk.keys = encode_keys(values.to(topk.keys.device), ids.to(topk.keys.device))  # (C, m), still sorted
        topk.count = int(count)
        return topk

    def __repr__(self) -> str:
        return f"StreamingTopK(channels={self.channels}, k={self.k}, count={self.count}, name={self.name!r})"
