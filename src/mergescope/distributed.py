"""The ``torch.distributed`` process group as mergescope's data passes see it (gloo on CPU, nccl on GPU).

Launched with ``torchrun --nproc_per_node N``, every rank runs the same command; each data pass walks only its
rank's share of the batches and combines its accumulators with the other ranks' before anything is finalised,
so every rank ends with the one-process result. The share is a contiguous range of the pass's batches — the
very batches one process would make (:func:`batch_range`) — so every image is reduced exactly as in one process;
only the order in which the per-batch partial results are added differs (float64 sums agree up to rounding,
integer counts and top-k selections exactly). Outside a process group (or with one rank) every helper here is
the identity, so a one-process pass runs unchanged, bit for bit.
"""
from __future__ import annotations

import atexit
import io
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import MergescopeError

T = TypeVar("T")
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def world() -> tuple[int, int]:
    """(rank, world size) of the running process group, or (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment) unless one exists.

    nccl when every local rank can have a GPU of its own (rank ``LOCAL_RANK`` on GPU ``LOCAL_RANK``), gloo
    otherwise; the group is destroyed at exit. Returns whether it initialised a group.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_size:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return True


def batch_range(num_batches: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous [first, stop) range of batch indices rank ``rank`` walks."""
    return rank * num_batches // world_size, (rank + 1) * num_batches // world_size


def shard(batches: Any, total: int | None = None) -> tuple[Any, int | None]:
    """This rank's share of a pass's ``batches`` and its length for a progress bar (``total``, if given).

    ``batches`` must be sized and sliceable (a list, or :func:`mergescope.data.iter_batches`, whose slices load
    only their own images) when the group has several ranks; with one rank it is returned as it is.
    """
    rank, size = world()
    if size == 1:
        return batches, total
    if not (hasattr(batches, "__len__") and hasattr(batches, "__getitem__")):
        raise MergescopeError(f"a pass sharded over {size} ranks needs batches it can split (a list or "
                              f"iter_batches(...)), got {type(batches).__name__}")
    first, stop = batch_range(len(batches), rank, size)
    mine = batches[first:stop]
    return mine, (None if total is None else len(mine))


def _comm_device() -> torch.device:
    """Where collective buffers must live: the current GPU for nccl, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape and dtype on all ranks), in rank order, on the CPU."""
    t = t.to(_comm_device()).contiguous()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``t`` combined elementwise over the ranks (``op``: sum, max or min), on ``t``'s device (a new tensor).

    Meant for float64 and int64 accumulators (sums of losses, counts): integer sums are exact.
    """
    if world()[1] == 1:
        return t
    buf = t.to(_comm_device(), copy=True).contiguous()
    dist.all_reduce(buf, op=_OPS[op])
    return buf.to(t.device)


def gather_objects(obj: T, device: torch.device | str = "cpu") -> list[T]:
    """Every rank's ``obj`` (anything ``torch.save`` takes), in rank order, its tensors on ``device``."""
    if world()[1] == 1:
        return [obj]
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    sizes = [int(s) for s in all_gather(torch.tensor([data.numel()], dtype=torch.int64))]
    padded = torch.zeros(max(sizes), dtype=torch.uint8)
    padded[: data.numel()] = data
    # the peers are this job's own processes: their pickles are as trusted as this one's
    return [torch.load(io.BytesIO(part[:n].numpy().tobytes()), map_location=device, weights_only=False)
            for part, n in zip(all_gather(padded), sizes)]


def merge_over_ranks(accumulators: Sequence[T], device: torch.device | str = "cpu") -> list[T]:
    """Each accumulator combined over every rank: rank 0's, then ``.merge(other)`` of ranks 1, 2, … in order.

    For streaming accumulators whose ``merge`` adds another shard's samples (Chan et al.'s moments, top-k):
    the same on every rank, bitwise; equal to one process up to float rounding. One rank: ``accumulators``.
    """
    if world()[1] == 1:
        return list(accumulators)
    shards = gather_objects(list(accumulators), device)
    merged = shards[0]
    for other in shards[1:]:
        for acc, part in zip(merged, other):
            acc.merge(part)
    return merged


def barrier() -> None:
    """Wait for every rank (no-op outside a group)."""
    if world()[1] > 1:
        dist.barrier()
