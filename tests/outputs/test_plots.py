"""outputs/plots.py: the report's figures."""

from __future__ import annotations

import numpy as np

from thumbclf.outputs import plots


def test_a_gallery_shows_names_that_are_not_utf8_escaped(tmp_path):
    """Issue 33, item 16: matplotlib refused the surrogates of a non-UTF-8 file name in the
    Undecided gallery: exit 1, no report, and --resume failed again."""
    odd = b"caf\xe9 \xff.png".decode("utf-8", "surrogateescape")
    items = [{"path": f"/slides/{odd}", "label": odd[:4], "decision": "Undecided", "prob": 0.4,
              "note": "low confidence"}]
    out = plots.gallery(items, tmp_path / "undecided.png", f"Undecided: {odd}",
                        lambda p: np.full((20, 30, 3), 200, np.uint8))
    assert out is not None and out.is_file() and out.stat().st_size > 1000


def test_gallery_captions_stay_inside_their_cell(tmp_path):
    """The captions of neighbouring thumbnails ran into each other (matplotlib titles wider than
    their axes): each line now fits its cell, at most four lines, the rest cut with an
    ellipsis; six thumbnails a row."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = plots._font(12)
    note = "best guess Biopsy 0.88, unfamiliar (look part 912 of threshold 800) " * 3
    lines = plots._wrapped(draw, f"→ Undecided ({note})", font, plots.CELL - 12, 3)
    assert len(lines) == 3 and lines[-1].endswith("…")
    assert all(draw.textlength(line, font=font) <= plots.CELL - 12 for line in lines)
    assert plots._wrapped(draw, "x" * 300, font, 100, 1)[0].endswith("…")
    items = [{"path": f"/s/{i}.png", "label": "IHC", "decision": "TMA", "prob": 0.9}
             for i in range(7)]
    out = plots.gallery(items, tmp_path / "g.png", "errors",
                        lambda p: np.full((20, 30, 3), 200, np.uint8))
    with Image.open(out) as sheet:
        assert sheet.width == 6 * plots.CELL
        one_row = plots.gallery(items[:6], tmp_path / "g6.png", "errors", lambda p: None)
        with Image.open(one_row) as first:
            assert first.height < sheet.height
