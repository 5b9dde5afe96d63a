"""The probe pass sharded over ``torch.distributed`` ranks (gloo on CPU, nccl on GPU; launch with torchrun).

Each rank takes a contiguous range of the pass's batches — the very batches one process would make — so every
image is reduced exactly as in a one-process run. At the end the accumulators are combined on every rank:

- top-k keys are all-gathered and merged; the (value desc, id asc) order is total, so the result is identical
  to one process, bit for bit;
- moments are all-gathered as (n, mean, m2) and merged in rank order with Chan's update: bitwise
  reproducible for a given world size, equal to one process up to float64 rounding;
- subset activations are all-reduced: each row comes from the one rank that saw that image, the others
  contribute exact zeros.

The process group itself (ranks, the batch-range rule, collectives) is :mod:`mergescope.distributed`.
"""
from __future__ import annotations

import torch

from ..distributed import all_gather, all_reduce, barrier, batch_range, world
from .state import ProbeState
from .stats import Moments
from .topk import EMPTY_KEY

__all__ = ["barrier", "batch_range", "gather_flags", "gather_state", "world"]  # the probe's view of the group


def gather_flags(flags: list[int]) -> torch.Tensor:
    """int64 [world, len(flags)]: every rank's flags (used to agree on resuming before any collective pass)."""
    if world()[1] == 1:
        return torch.tensor([flags], dtype=torch.int64)
    return torch.stack(all_gather(torch.tensor(flags, dtype=torch.int64)))


def gather_state(state: ProbeState) -> None:
    """Replace every rank's shard accumulators by the combination over all ranks (in place, on every rank)."""
    counts = [int(c) for c in all_gather(torch.tensor([state.images_seen], dtype=torch.int64))]
    total, k = sum(counts), state.k
    sizes = [state.topk[key].channels for key in state.keys]

    # top-k: pad each (C, m) key table to (C, k) with keys below any real one, gather, re-select.
    padded = []
    for key in state.keys:
        keys = state.topk[key].keys.cpu()  # (C, m)
        pad = torch.full((keys.shape[0], k - keys.shape[1]), EMPTY_KEY, dtype=torch.int64)
        padded.append(torch.cat([keys, pad], 1).flatten())
    shards = [s.split([c * k for c in sizes]) for s in all_gather(torch.cat(padded))]
    for i, key in enumerate(state.keys):
        pool = torch.cat([shard[i].view(sizes[i], k) for shard in shards], 1)  # (C, world * k)
        topk = state.topk[key]
        topk.keys = pool.topk(min(k, total), dim=1).values.to(state.device)
        topk.count = total

    # moments: (mean, m2) per layer, merged in rank order
    parts = []
    for key, c in zip(state.keys, sizes):
        mom = state.moments[key]
        parts += [torch.zeros(2 * c, dtype=torch.float64)] if mom.mean is None else [mom.mean.cpu(), mom.m2.cpu()]
    shards = [s.split([n for c in sizes for n in (c, c)]) for s in all_gather(torch.cat(parts))]
    for i, key in enumerate(state.keys):
        merged = Moments()
        for r, shard in enumerate(shards):
            if counts[r]:
                part = Moments()
                part.n, part.mean, part.m2 = counts[r], shard[2 * i], shard[2 * i + 1]
                merged.merge(part)
        if merged.mean is not None:
            merged.mean, merged.m2 = merged.mean.to(state.device), merged.m2.to(state.device)
        state.moments[key] = merged

    # subset rows: each filled by exactly one rank, zeros elsewhere
    if state.subset:
        flat = all_reduce(torch.cat([state.subset[key].flatten() for key in state.keys]))
        for key, part in zip(state.keys, flat.split([state.subset[key].numel() for key in state.keys])):
            state.subset[key] = part.view_as(state.subset[key]).to(state.device)

    state.images_seen = total
