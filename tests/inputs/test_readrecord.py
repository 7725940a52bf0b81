"""The per-slide read record and reader robustness.

Issue 30: which reader and level gave a thumbnail, the level's size and MPP (and where the MPP
came from), the bytes and seconds, kept beside the cached thumbnail so that it survives the
cache; the input table's MPP column; a corrupt pyramid level is skipped for the next one, with
OpenSlide reopened rather than its failed handle reused.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import make_pyramid
from thumbclf.core import table as table_io
from thumbclf.core.errors import DataError, ImageReadError
from thumbclf.inputs import readrecord, slides, tiles
from thumbclf.inputs.samples import discover


def corrupt_level(path: Path, level: int) -> None:
    """Overwrite every stored tile of one pyramid level of a TIFF with junk."""
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[level].keyframe
        spans = [(int(o), int(n)) for o, n in zip(page.dataoffsets, page.databytecounts) if n]
    with open(path, "r+b") as fh:
        for offset, length in spans:
            fh.seek(offset)
            fh.write(b"\x5a" * length)


def test_the_record_survives_the_cache_with_the_level_its_size_and_mpp(tmp_path):
    p = make_pyramid(tmp_path / "s.tiff")
    cache = tmp_path / "cache"
    stats = tiles.ReadStats()
    slides.thumbnail(p, 600, cache_dir=cache, stats=stats)
    assert stats.reader == "openslide" and stats.level_size == (750, 500) and stats.level == 2
    assert stats.encoded_bytes > 0
    again = tiles.ReadStats()
    slides.thumbnail(p, 600, cache_dir=cache, stats=again)  # a cache hit reads nothing ...
    assert again.encoded_bytes == 0
    cols = readrecord.of_slide(p, 600, cache, properties=slides.properties(p), mpp_override=None)
    # ... and the record of the read that made the thumbnail is what the row says
    assert cols[table_io.READ_READER] == "openslide" and cols[table_io.READ_LEVEL] == 2
    assert (cols[table_io.READ_LEVEL_WIDTH], cols[table_io.READ_LEVEL_HEIGHT]) == (750, 500)
    assert cols[table_io.READ_BYTES] == stats.encoded_bytes
    assert cols[table_io.READ_SECONDS] == pytest.approx(stats.seconds, abs=1e-3)
    assert cols[table_io.READ_MPP] is None and cols[table_io.READ_MPP_SOURCE] == "none"
    over = readrecord.of_slide(p, 600, cache, properties=slides.properties(p), mpp_override=0.25)
    assert over[table_io.READ_MPP] == pytest.approx(1.0)  # 0.25 um at 3000 px; level is /4
    assert over[table_io.READ_MPP_SOURCE] == "override"


def test_the_header_mpp_is_scaled_to_the_level_read():
    cols = readrecord.columns({"reader": "tiff tiles", "level": 1, "level_width": 750,
                               "level_height": 500, "encoded_bytes": 10, "seconds": 0.5},
                              width=1500, mpp_override=None, mpp_header=0.5)
    assert cols[table_io.READ_MPP] == pytest.approx(1.0)
    assert cols[table_io.READ_MPP_SOURCE] == "header"
    assert readrecord.columns(None, width=1, mpp_override=None, mpp_header=None) is None


def test_a_corrupt_openslide_level_is_skipped_with_a_fresh_handle(tmp_path, monkeypatch):
    p = make_pyramid(tmp_path / "s.tiff")
    good = np.asarray(slides.thumbnail(p, 600), dtype=float)
    corrupt_level(p, 2)  # the level a 600 px thumbnail is read from
    opened = []
    real_open = slides._open_slide
    monkeypatch.setattr(slides, "_open_slide", lambda path: opened.append(
        real_open(path)) or opened[-1])
    stats = tiles.ReadStats()
    img = slides.thumbnail(p, 600, stats=stats)
    assert stats.level == 1 and stats.level_size == (1500, 1000)
    assert re.match(r"level 2 unreadable \(.+\); read level 1 instead$", stats.note), stats.note
    assert len(opened) == 2  # the handle that met the error was not reused
    assert np.abs(np.asarray(img, dtype=float) - good).mean() < 4.0


def test_a_corrupt_jpeg_level_is_skipped_and_said_in_the_row(tmp_path):
    from inputs.test_archives import jpeg_tiff, picture

    p = jpeg_tiff(tmp_path / "j.tiff", picture(1600, 1200), pyramid=True)
    chosen = slides.tiled_level(p, 256)[0]
    corrupt_level(p, chosen)
    cache = tmp_path / "cache"
    stats = tiles.ReadStats()
    slides.thumbnail(p, 256, cache_dir=cache, stats=stats)
    assert stats.reader == "tiff tiles" and stats.level == chosen - 1
    cols = readrecord.of_slide(p, 256, cache, properties=slides.properties(p), mpp_override=None)
    assert cols[table_io.READ_NOTE].startswith(f"level {chosen} unreadable")
    assert cols[table_io.READ_MPP_SOURCE] == "header" and cols[table_io.READ_MPP] > 0.5


def test_every_level_corrupt_is_one_error_naming_the_slide(tmp_path):
    p = make_pyramid(tmp_path / "s.tiff")
    with tifffile.TiffFile(p) as tif:
        count = len(tif.series[0].levels)
    for level in range(count):
        corrupt_level(p, level)
    with pytest.raises(ImageReadError, match=re.escape(f"{p}: cannot read the slide's pixels")):
        slides.thumbnail(p, 600)


def test_the_mpp_column_of_a_table_overrides_and_bad_values_name_the_row(tmp_path):
    pd.DataFrame({"PATH": ["a.png", "b.png"], "mpp": ["0.25", ""]}).to_csv(
        tmp_path / "t.csv", index=False)
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"")
    found = discover(tmp_path / "t.csv", need_labels=False).samples
    assert [s.mpp for s in found] == [0.25, None]
    pd.DataFrame({"PATH": ["a.png", "b.png"], "MPP": ["0.25", "fast"]}).to_csv(
        tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"bad.csv: row 3: MPP must be .*got 'fast'"):
        discover(tmp_path / "bad.csv", need_labels=False)
