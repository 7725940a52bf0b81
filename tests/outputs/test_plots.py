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
