"""outputs/tally.py: every input accounted for, by status and reason, and how slides were read."""

import pandas as pd

from thumbclf.core import table as table_io
from thumbclf.outputs import tally


def test_every_input_is_counted_by_status():
    table = pd.DataFrame({
        "PATH": list("abcdef"), "model_prediction": ["IHC", "Undecided", "Undecided", "", "", ""],
        "undecided_reason": ["", "low confidence", "unfamiliar", "", "", ""],
        "error": ["", "", "", "d: gone", "e: reading stopped after 1 s", "f: file not found"],
        "error_kind": ["", "", "", "not found", "too large", "unreadable"]})
    assert tally.counts(table) == {"decided": 1, "Undecided: low confidence": 1,
                                   "Undecided: unfamiliar": 1, "not found": 1, "too large": 1,
                                   "unreadable": 1}  # by kind: f's words do not count
    note = tally.closing_note(table, [{"path": "/x/slow.tiff", "seconds": 2.5,
                                       "reader": "tiff tiles", "level": 0, "dct_scale": 8}])
    assert note.startswith("every input accounted for: 6 rows = 1 decided")
    assert note.endswith("slowest slides: slow.tiff 2.50 s (tiff tiles, level 0 at 1/8)")


def test_a_table_without_error_kinds_counts_its_errors_as_unreadable():
    """Tables of versions before the error_kind column (issue 32): never guessed from words."""
    table = pd.DataFrame({"PATH": ["a", "b"], "model_prediction": ["", "A"],
                          "error": ["a: file not found", ""]})
    assert tally.counts(table) == {"decided": 1, "unreadable": 1}


def test_the_report_sums_up_how_the_slides_were_read():
    rows = pd.DataFrame({"PATH": ["a", "b", "c"], table_io.DECISION: ["A", "A", "B"],
                         table_io.READ_READER: ["openslide", "dicom frames", ""],
                         table_io.READ_MPP_SOURCE: ["header", "override", ""],
                         table_io.READ_BYTES: [1_000_000, 500_000, None],
                         table_io.READ_SECONDS: [0.5, 0.25, None],
                         table_io.READ_NOTE: ["", "level 1 unreadable (x); read level 0", ""]})
    line = tally.read_summary(rows)
    assert line == ("2 slides read (openslide 1, dicom frames 1); MPP from header 1, override 1; "
                    "1.5 MB read in 0.8 s; 1 read from another level because one was corrupt "
                    "(see read_note)")
    assert "How the slides were read" in tally.section(rows, [])[1]
    assert tally.read_summary(rows.drop(columns=[table_io.READ_READER])) == ""
