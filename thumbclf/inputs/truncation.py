"""A truncated TIFF (a partly copied slide, common in archive transfers) named as such: its
directories, strips or tiles point past the end of the file (issue 31, item 6; issue 33,
item 2)."""

from __future__ import annotations

import os
from pathlib import Path

from thumbclf.core.errors import ImageReadError
from thumbclf.core.files import regular_file

_TIFF_TYPES = {1: "B", 3: "H", 4: "I", 13: "I", 16: "Q", 17: "q", 18: "Q"}  # the offset types


def truncation(path: Path) -> str | None:
    """"truncated or corrupt: ..." when a TIFF's structure (its directories, strips or tiles)
    points past the end of the file; None when it does not, or the file is not a TIFF. Reads
    the directories only (a few kB), at most 4096 of them."""
    import numpy as np

    try:
        regular_file(path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(16)
            order = {b"II": "<", b"MM": ">"}.get(head[:2])
            if order is None or len(head) < 16:
                return None
            big = int.from_bytes(head[2:4], "little" if order == "<" else "big") == 43
            fmt = order + ("Q" if big else "I")
            offset = int(np.frombuffer(head[8:16] if big else head[4:8], fmt)[0])
            word, entry = (8, 20) if big else (4, 12)
            for _ in range(4096):
                if offset == 0:
                    return None
                f.seek(offset)
                raw = f.read(8 if big else 2)
                if offset + len(raw) > size or len(raw) < (8 if big else 2):
                    return _truncated(size)
                n = int(np.frombuffer(raw, order + ("Q" if big else "H"))[0])
                block = f.read(n * entry + word)
                if len(block) < n * entry + word:
                    return _truncated(size)
                ends = _ifd_data_ends(f, block, n, order, big, size)
                if ends is None or ends > size:
                    return _truncated(size)
                offset = int(np.frombuffer(block[n * entry:], fmt)[0])
    except (OSError, ValueError, ImageReadError):
        return None
    return None


def _truncated(size: int) -> str:
    return (f"truncated or corrupt: the TIFF structure points past the end of the file "
            f"({size} bytes); copy the slide again")


def _ifd_data_ends(f, block: bytes, n: int, order: str, big: bool, size: int) -> int | None:
    """The furthest byte a directory's strips or tiles reach (0 without any); None where their
    offsets or counts cannot be read."""
    import numpy as np

    word, entry = (8, 20) if big else (4, 12)
    values: dict[int, np.ndarray] = {}
    for i in range(n):
        e = block[i * entry:(i + 1) * entry]
        tag, kind = (int(v) for v in np.frombuffer(e[:4], order + "H"))
        if tag not in (273, 279, 324, 325) or kind not in _TIFF_TYPES:
            continue
        count = int(np.frombuffer(e[4:4 + word], order + ("Q" if big else "I"))[0])
        dtype = np.dtype(order + _TIFF_TYPES[kind])
        nbytes = count * dtype.itemsize
        if nbytes <= word:
            data = e[4 + word:4 + word + nbytes]
        else:
            at = int(np.frombuffer(e[4 + word:], order + ("Q" if big else "I"))[0])
            if at + nbytes > size or nbytes > 64 << 20:
                return None
            here = f.tell()
            f.seek(at)
            data = f.read(nbytes)
            f.seek(here)
        values[tag] = np.frombuffer(data, dtype).astype(np.uint64)
    end = 0
    for offsets, counts in ((273, 279), (324, 325)):
        if offsets in values and counts in values and len(values[offsets]) == len(values[counts]):
            used = values[counts] > 0
            if used.any():
                end = max(end, int((values[offsets][used] + values[counts][used]).max()))
    return end
