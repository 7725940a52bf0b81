"""The read record of a slide (issue 30): which reader and level gave its thumbnail, the
level's size and microns per pixel (and where that came from), DICOM's photometric
interpretation, the bytes read and the seconds it took.

The record is written beside the cached thumbnail when the slide is read (``slides.thumbnail``),
so a later run, fold or step that reuses the thumbnail reports how it was read, not a
zero-second cache hit. The microns per pixel of the level read are those of the full-resolution
level (an override from the input table's MPP column, else the slide's header) times the level's
downsample.
"""

from __future__ import annotations

import math
from pathlib import Path

from thumbclf.core.table import (MPP_HEADER, MPP_NONE, MPP_OVERRIDE, READ_BYTES, READ_LEVEL,
                                 READ_LEVEL_HEIGHT, READ_LEVEL_WIDTH, READ_MPP, READ_MPP_SOURCE,
                                 READ_NOTE, READ_PHOTOMETRIC, READ_READER, READ_SECONDS,
                                 SLIDE_MPP_X, SLIDE_WIDTH)
from thumbclf.inputs import slides


def _number(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def mpp_in_force(override: float | None, header: float | None) -> tuple[float | None, str]:
    """The full-resolution microns per pixel and where it came from (override, header, none)."""
    if _number(override) is not None:
        return float(override), MPP_OVERRIDE
    if _number(header) is not None:
        return float(header), MPP_HEADER
    return None, MPP_NONE


def columns(record: dict | None, *, width: int | None, mpp_override: float | None,
            mpp_header: float | None) -> dict | None:
    """A slide's read-record columns from its stored record (None: nothing recorded).

    ``width`` is the full-resolution width (to turn the base MPP into the level's MPP)."""
    if record is None:
        return None
    base, source = mpp_in_force(mpp_override, mpp_header)
    level_w, level_h = record.get("level_width"), record.get("level_height")
    mpp = None
    if base is not None and _number(level_w) and _number(width):
        mpp = round(base * float(width) / float(level_w), 6)
    return {READ_READER: record.get("reader") or "", READ_LEVEL: record.get("level"),
            READ_LEVEL_WIDTH: level_w, READ_LEVEL_HEIGHT: level_h, READ_MPP: mpp,
            READ_MPP_SOURCE: source, READ_PHOTOMETRIC: record.get("photometric") or "",
            READ_BYTES: record.get("encoded_bytes"), READ_SECONDS: record.get("seconds"),
            READ_NOTE: record.get("note") or ""}


def of_slide(path: Path, long_side: int, cache_dir: Path, *, properties: dict | None,
             mpp_override: float | None) -> dict | None:
    """The read-record columns of a slide whose thumbnail is cached in ``cache_dir``."""
    props = properties or {}
    return columns(slides.read_record(path, long_side, cache_dir),
                   width=props.get(SLIDE_WIDTH), mpp_override=mpp_override,
                   mpp_header=props.get(SLIDE_MPP_X))
