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

    # top-k: pad the (ΣC, m) key table to (ΣC, k) with keys below any real one, gather, re-select.
    keys = state.topk.keys.cpu()
    padded = torch.cat([keys, torch.full((keys.shape[0], k - keys.shape[1]), EMPTY_KEY, dtype=torch.int64)], 1)
    pool = torch.cat(all_gather(padded), 1)  # (ΣC, world · k)
    state.topk.keys = pool.topk(min(k, total), dim=1).values.to(state.device)
    state.topk.count = total

    # moments: (mean, m2) of every column, merged in rank order
    mom, c = state.moments, state.topk.channels
    mine = torch.zeros(2, c, dtype=torch.float64) if mom.mean is None else torch.stack([mom.mean.cpu(), mom.m2.cpu()])
    merged = Moments()
    for n, (mean, m2) in zip(counts, all_gather(mine)):
        if n:
            part = Moments()
            part.n, part.mean, part.m2 = n, mean, m2
            merged.merge(part)
    if merged.mean is not None:
        merged.mean, merged.m2 = merged.mean.to(state.device), merged.m2.to(state.device)
    state.moments = merged

    # subset rows: each filled by exactly one rank, zeros elsewhere
    if state.subset is not None:
        state.subset = all_reduce(state.subset.cpu()).to(state.device)

    state.images_seen = total
