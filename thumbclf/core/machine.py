"""Facts about the machine this run is on: the cores it may use, its memory; and how this
process asks for memory."""

from __future__ import annotations

import functools
import os
import sys

# glibc's malloc maps a block of more than M_MMAP_THRESHOLD (128 KiB at start, adjusted up to
# 32 MiB) straight from the system and gives it back when it is freed. A model's activations are
# larger than that, so every batch mapped them anew, page by page: ResNet-18 at batch 64 took
# 0.4-0.5 million page faults and 0.75-0.97 s of system time a batch on 2 cores, a third of
# its time (bench/inference.py). Blocks up to KEEP_BLOCKS come from the heap instead, and up to
# KEEP_FREE bytes of freed heap stay for the next batch; larger blocks are still given back.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
KEEP_BLOCKS = 2**30
KEEP_FREE = 2**31 - 1  # mallopt takes an int
# where the user has tuned glibc's malloc, thumbclf leaves it as they set it
MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_",
                   "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def cores() -> int:
    """The CPU cores this process may use (its affinity where the system tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def workers(requested: int = -1) -> int:
    """Decoding worker processes: as many as requested (num_workers), -1 = one per core."""
    return requested if requested >= 0 else cores()


def available_memory() -> int:
    """Physical memory in bytes (a conservative 8 GiB where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


@functools.cache  # once a process
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks of up to KEEP_BLOCKS for reuse, in this process
    and the decoding workers it forks afterwards, instead of mapping them anew for each batch.
    The arithmetic is untouched; the process holds on to up to KEEP_FREE bytes of freed memory
    (its peak, in practice) until it ends. Whether it was applied: not where the user set
    glibc's malloc settings (MALLOC_SETTINGS), nor with other C libraries (macOS, Windows,
    musl)."""
    if not sys.platform.startswith("linux") or any(k in os.environ for k in MALLOC_SETTINGS):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # not glibc
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the block size first: where this glibc refuses it, malloc is left exactly as it was
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BLOCKS)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                       KEEP_FREE))
