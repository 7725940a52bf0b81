"""predict/stream.py: the predictions table from the partial file."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from thumbclf.core.files import append_whole
from thumbclf.inputs.samples import Sample, SampleSet
from thumbclf.predict import stream


def test_a_slide_that_fails_after_reading_is_its_row_not_the_whole_table(tmp_path):
    """Issue 33, item 2: its tiles were read and predicted, then final_table asked for the
    slide's properties, and the deploy ended with exit 2 and no predictions.csv for any slide
    (and --resume failed the same way forever)."""
    import tifffile

    good, cut = tmp_path / "good.svs", tmp_path / "cut.svs"
    img = np.random.default_rng(0).integers(0, 255, (1200, 1600, 3), dtype=np.uint8)
    with tifffile.TiffWriter(good) as tw:
        for k in (1, 4):
            tw.write(img[::k, ::k].copy(), tile=(256, 256), photometric="rgb", compression="jpeg",
                     description="Aperio Image Library v12.0.0\n1600x1200 |AppMag = 20|MPP = 0.5"
                     if k == 1 else "", subfiletype=0 if k == 1 else 1)
    cut.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    classes = ("A", "B")
    samples = SampleSet(samples=(Sample(good), Sample(cut)), classes=classes, has_patients=False,
                        source=tmp_path)
    partial = tmp_path / "partial.csv"
    append_whole(partial, "".join(",".join(map(str, r)) + "\n" for r in (
        stream.partial_header(classes), [0, 0.9, 0.1, "A", "", "", ""],
        [1, 0.2, 0.8, "B", "", "", ""])).encode())
    table = stream.final_table(samples, partial, classes, False, 0.5, [True, True])
    assert list(table["model_prediction"].fillna("")) == ["A", ""]
    assert table["error"][0] == "" and "truncated or corrupt" in table["error"][1]
    assert table["error_kind"].tolist() == ["", "unreadable"]
    assert np.isnan(table["B"][1]) and table["B"][0] == pytest.approx(0.1)
    assert table["slide_width"][0] == 1600 and table["slide_width"].isna()[1]


def test_an_earlier_versions_partial_file_is_refused_before_anything_starts(tmp_path):
    """Issue 32: a partial file without the error_kind column, every image predicted (killed
    before predictions.csv was written): the one-line refusal, not a KeyError from final_table."""
    from types import SimpleNamespace

    from thumbclf.core import layout
    from thumbclf.core.errors import OutputError

    classes = ("A", "B")
    old = stream.partial_header(classes)[:-1]
    append_whole(tmp_path / layout.PARTIAL, "".join(",".join(map(str, r)) + "\n" for r in (
        old, [0, 0.9, 0.1, "A", *[""] * (len(old) - 4)])).encode())
    samples = SampleSet(samples=(Sample(tmp_path / "a.png"),), classes=classes,
                        has_patients=False, source=tmp_path)
    with pytest.raises(OutputError, match="written with other columns .* start a new run"):
        stream.predict_stream([SimpleNamespace(classes=classes)], samples, tmp_path, spec=None,
                              threshold=0.5, device=None, resume=True)


def test_a_full_disk_before_the_first_row_still_resumes(tmp_path, monkeypatch):
    """Issue 10, item 3: nothing lost."""
    from thumbclf.predict.stream import _done_positions
    from thumbclf.core.errors import OutputError

    partial = tmp_path / "predictions.partial.csv"

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OutputError, match="--resume"):
        append_whole(partial, b"position,A,B\n0,0.5,0.5\n")
    monkeypatch.undo()
    assert _done_positions(partial) == set() and not partial.exists()
