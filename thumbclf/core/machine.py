"""Facts about the machine this run is on: the cores it may use, its memory; and how this
process asks for memory."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Iterator

# glibc's malloc maps a block of more than M_MMAP_THRESHOLD (128 KiB at start, adjusted up to
# 32 MiB) straight from the system and gives it back when it is freed. A model's activations are
# larger than that, so every batch mapped them anew, page by page: ResNet-18 at batch 64 took
# 0.4-0.5 million page faults and 0.75-0.97 s of system time a batch on 2 cores, a third of
# its time (bench/inference.py --allocator). Blocks up to KEEP_BLOCKS come from the heap
# instead (glibc before 2.35 refuses more than 32 MiB: there no block is mapped, M_MMAP_MAX 0),
# and freed heap is kept for the next batch. Blocks that a thread other than the main one asks
# for beyond glibc's 64 MiB per-thread heaps are still mapped anew.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt's parameters (malloc.h)
KEEP_BLOCKS = 2**30
KEEP_FREE = 2**31 - 1  # mallopt takes an int


def user_set_malloc() -> bool:
    """Whether the environment sets glibc's malloc (MALLOC_* or GLIBC_TUNABLES=glibc.malloc.*):
    then thumbclf leaves it as the user set it."""
    return (any(k.startswith("MALLOC_") for k in os.environ)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""))


@functools.cache  # looked up once a process
def _glibc():
    """The C library where it is glibc (Linux), else None (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt",
                                                 "malloc_trim")):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


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
    (and the processes it forks afterwards), instead of mapping them anew for each batch. The
    arithmetic is untouched; the process holds on to about its peak memory until it ends, or
    until ``returned_memory`` gives it back. Whether it was applied: not where the user set
    glibc's malloc (``user_set_malloc``), nor with other C libraries (macOS, Windows, musl)."""
    libc = None if user_set_malloc() else _glibc()
    if libc is None:
        return False
    # the block size first: where it is refused, malloc is left exactly as it was
    if not (libc.mallopt(M_MMAP_THRESHOLD, KEEP_BLOCKS) or libc.mallopt(M_MMAP_MAX, 0)):
        return False
    return bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREE))


def memory_kept() -> bool:
    """Whether this process keeps freed memory (``keep_freed_memory`` was called and applied),
    without applying it: for timings.json."""
    return bool(keep_freed_memory.cache_info().currsize) and keep_freed_memory()


@contextlib.contextmanager
def returned_memory() -> Iterator[None]:
    """A run's block: after it, the freed memory that ``keep_freed_memory`` kept goes back to
    the system (glibc's malloc_trim), so that a process that goes on (a notebook after
    ``thumbclf.deploy()``) does not hold the run's peak."""
    try:
        yield
    finally:
        if memory_kept():
            _glibc().malloc_trim(0)
