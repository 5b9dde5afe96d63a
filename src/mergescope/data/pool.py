"""An order-preserving process pool map over chunks of work (fork where the platform has it)."""

import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from typing import Any


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def chunk_bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into at most ``chunks`` contiguous, near-equal (start, stop) pieces."""
    chunks = max(1, min(chunks, n))
    edges = [round(k * n / chunks) for k in range(chunks + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def parallel_starmap(fn: Callable[..., Any], arg_tuples: Sequence[tuple], workers: int | None = None) -> list:
    """``[fn(*args) for args in arg_tuples]`` in a process pool, results in order.

    The first failing task in *order* raises (not the first to fail in time), so error messages
    name the first offending item. ``workers`` ≤ 1, a single task, or a daemonic caller (e.g. a
    DataLoader worker, which may not have children) runs in this process.
    """
    workers = cpu_count() if workers is None else workers
    workers = min(workers, len(arg_tuples))
    if workers <= 1 or mp.current_process().daemon:
        return [fn(*args) for args in arg_tuples]
    # fork: workers only run Pillow/numpy, and skip re-importing torch (seconds under spawn).
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(workers) as pool:
        pending = [pool.apply_async(fn, args) for args in arg_tuples]
        return [p.get() for p in pending]
