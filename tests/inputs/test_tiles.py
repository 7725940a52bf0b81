"""inputs/tiles.py: reading a tiled level has a memory and a time bound that hostile sizes,
counts and empty levels cannot break (issue 33, items 13 and 14)."""

from __future__ import annotations

import io
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thumbclf.core.errors import ImageReadError
from thumbclf.inputs import tiles

MEMORY_BOUND = 16_000_000  # bytes held while reading any level for a 512 px thumbnail
TIME_SLACK_S = 2.0  # past the budget: one chunk of tiles at most


def jpeg_tile(w: int, h: int, colour=(200, 80, 150)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def level_of(tmp_path: Path, width: int, height: int, tile: int, stored) -> tiles.TiledLevel:
    """A level whose tiles (where ``stored(tx, ty)``) are one small JPEG in a file."""
    data = jpeg_tile(tile, tile)
    source = tmp_path / "tiles.bin"
    source.write_bytes(data)
    return tiles.TiledLevel(width, height, tile, tile, source,
                            lambda tx, ty: [(0, len(data))] if stored(tx, ty) else None)


def test_a_huge_level_of_odd_tiles_is_read_in_bounded_memory(tmp_path):
    """A 2.4 KB DICOM (tiles of 250 px, a level of 60,000 px square) peaked at 6.25 GB: a tile
    size no DCT scale divides held the reduction back to 1/2 and the canvas to 30,000 px."""
    level = level_of(tmp_path, 12_000, 12_000, 250, lambda tx, ty: (tx + ty) % 7 == 0)
    stats = tiles.ReadStats()
    tracemalloc.start()
    img = tiles.render(level, (512, 512), deadline=None, where="odd", budget_s=10, stats=stats)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert img.size == (512, 512)
    assert stats.canvas_pixels <= 4 * 4 * 512 * 512 and peak < MEMORY_BOUND
    arr = np.asarray(img, dtype=int)
    assert (np.abs(arr - (200, 80, 150)).sum(axis=2) < 60).mean() > 0.05  # tiles placed


def test_tile_counts_and_sizes_are_refused_before_anything_is_allocated(tmp_path):
    """A 722-byte DICOM of 20,000,000 one-pixel frames ran 54.6 s and hit 6 GB."""
    many = tiles.TiledLevel(20_000, 1_000, 1, 1, tmp_path / "none", lambda tx, ty: None)
    started = time.perf_counter()
    with pytest.raises(tiles.SlideTooLarge, match=r"20,000,000 tiles in the level read"):
        tiles.render(many, (512, 26), deadline=time.perf_counter() + 10, where="many",
                     budget_s=10)
    huge = tiles.TiledLevel(100_000, 100_000, 50_000, 50_000, tmp_path / "none",
                            lambda tx, ty: None)
    with pytest.raises(tiles.SlideTooLarge, match=r"tiles of 50000 x 50000 pixels"):
        tiles.render(huge, (512, 512), deadline=None, where="huge", budget_s=10)
    assert time.perf_counter() - started < 1.0


def test_the_budget_is_checked_inside_a_row_of_many_tiles(tmp_path):
    """A 386 KB TIFF of one row of 40,000 tiles ran 65.6 s against a 5 s budget: the budget was
    checked between rows only."""
    level = level_of(tmp_path, 40_000 * 256, 256, 256, lambda tx, ty: True)
    budget = 0.5
    started = time.perf_counter()
    with pytest.raises(tiles.SlideTooLarge, match=r"reading stopped after 0.5 s"):
        tiles.render(level, (1024, 1), deadline=time.perf_counter() + budget, where="row",
                     budget_s=budget)
    assert time.perf_counter() - started < budget + TIME_SLACK_S


def test_a_level_with_no_pixel_data_stored_is_an_error_not_white_glass(tmp_path):
    """A DICOM level with no frame stored, or a TIFF whose tiles are all empty, rendered as
    white glass and was decided "Fat" at 0.978."""
    empty = level_of(tmp_path, 4_000, 3_000, 256, lambda tx, ty: False)
    with pytest.raises(ImageReadError, match=r"empty: no pixel data stored"):
        tiles.render(empty, (512, 384), deadline=None, where="empty", budget_s=10)
    zero = tiles.TiledLevel(4_000, 3_000, 256, 256, tmp_path / "tiles.bin",
                            lambda tx, ty: [(0, 0)])  # every tile of zero bytes
    with pytest.raises(ImageReadError, match=r"zero: no pixel data stored"):
        tiles.render(zero, (512, 384), deadline=None, where="zero", budget_s=10)
