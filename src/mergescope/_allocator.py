"""Keep freed activation memory in the process for the next batch (glibc's malloc; elsewhere a no-op).

A data pass allocates the same large activations batch after batch. glibc serves every block above its mmap
threshold with a fresh ``mmap`` and unmaps it on free, so each batch's activations fault their pages in again:
measured on ResNet20 (bench/data_passes.py --stats, 2026-12-02), the same convolutions ran ~1.5× slower inside a
pass that keeps its tapped activations alive than in a bare forward. Raising the mmap threshold to its maximum
and not trimming the heap's top makes freed blocks reusable; the process's peak memory is unchanged, only
memory freed after the peak stays mapped (to the process, not the machine's page cache).

Blocks above that largest threshold (32 MB: a VGG11 activation of 500 32² images is 131 MB) would still be mapped
afresh each batch, so they are served from the heap too (no mmap at all; glibc falls back to mmap where the heap
cannot grow). Measured (bench/page_faults.py, bench/RESULTS.md 2026-12-04b): without this, a bare VGG11-BN forward
of 500 images faulted ~13× more pages and ran ~11% slower; with it, peak memory was ~4% higher.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4  # glibc's mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's largest accepted value on 64-bit systems
_KEEP = 1024 * 1024 * 1024  # heap top kept before trimming, and padding of each heap growth


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Tune glibc's malloc once per process for repeated large allocations; False where it is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(p, v) == 1 for p, v in ((_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, _KEEP),
                                               (_M_TOP_PAD, 64 * 1024 * 1024), (_M_MMAP_MAX, 0)))
