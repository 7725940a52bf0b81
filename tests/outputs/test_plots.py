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
    lines = plots._wrapped(f"→ Undecided ({note})", font, plots.CELL - 12, 3)
    assert len(lines) == 3 and lines[-1].endswith("…")
    assert all(draw.textlength(line, font=font) <= plots.CELL - 12 for line in lines)
    assert plots._wrapped("x" * 300, font, 100, 1)[0].endswith("…")
    items = [{"path": f"/s/{i}.png", "label": "IHC", "decision": "TMA", "prob": 0.9}
             for i in range(7)]
    out = plots.gallery(items, tmp_path / "g.png", "errors",
                        lambda p: np.full((20, 30, 3), 200, np.uint8))
    with Image.open(out) as sheet:
        assert sheet.width == 6 * plots.CELL
        one_row = plots.gallery(items[:6], tmp_path / "g6.png", "errors", lambda p: None)
        with Image.open(one_row) as first:
            assert first.height < sheet.height


def test_a_gallery_of_one_shows_its_whole_title_and_any_thumbnail_a_loader_gives(tmp_path):
    """A one-item gallery (a model with one error) cut its title at both ends (a sheet one
    cell wide); a loader's float, 16-bit, one-channel or empty thumbnail broke the drawing or
    came out black; a 20,000-character label took 44 s to fit."""
    import time

    from PIL import Image, ImageDraw

    title = "Undecided slides, with their best guess (highest first)"
    item = {"path": "/s/a.png", "label": "x" * 20000, "decision": "Undecided", "prob": 0.4}
    started = time.monotonic()
    out = plots.gallery([item], tmp_path / "one.png", title,
                        lambda p: np.full((20, 30), 0.8))  # floats in 0-1, one channel
    assert time.monotonic() - started < 5
    with Image.open(out) as sheet:
        draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        assert sheet.width >= draw.textlength(title, font=plots._font(15)) + 20
        grey = np.asarray(sheet.convert("RGB"))[100:, :, 0]
        assert (grey == 204).any()  # 0.8 drawn as 204, not black
    for thumb in (np.full((8, 8, 1), 300, np.uint16), np.zeros((0, 0, 3), np.uint8)):
        assert plots._picture(thumb) is None or np.asarray(plots._picture(thumb)).max() == 255
    assert plots._picture(np.zeros((0, 0, 3), np.uint8)) is None
