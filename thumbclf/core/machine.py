"""Facts about the machine this run is on: the cores it may use, its memory."""

from __future__ import annotations

import os


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
