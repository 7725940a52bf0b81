"""Every input accounted for: counts by status and reason, and the slowest slides.

A run over 100,000 slides ends with what to look at: how many were decided, Undecided (and
why), unreadable, too large for the per-slide budget, incomplete (a MIRAX data file or DICOM
level missing), and the slides that took longest to read.
"""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path

import pandas as pd

from thumbclf.core.decide import LOW_CONFIDENCE, REASONS, UNDECIDED
from thumbclf.core.errors import ERROR_KINDS, UNREADABLE
from thumbclf.core.table import (DECISION, ERROR, ERROR_KIND, MPP_HEADER, MPP_NONE,
                                 MPP_OVERRIDE, READ_BYTES, READ_MPP_SOURCE, READ_NOTE,
                                 READ_READER, READ_SECONDS, REASON)
from thumbclf.inputs import slides

ORDER = ("decided", *(f"Undecided: {r}" for r in REASONS), *ERROR_KINDS)


def status(decision: str, reason: str, error: str, kind: str = "") -> str:
    """One row's status: decided, Undecided (and why) or, for a row with an error, its kind
    (error_kind; a table without that column, of an older version: 'unreadable')."""
    if error:
        return kind if kind in ERROR_KINDS else UNREADABLE
    if decision == UNDECIDED:
        return f"Undecided: {reason or LOW_CONFIDENCE}"
    return "decided"


def counts(table: pd.DataFrame) -> dict[str, int]:
    """Rows per status, in a fixed order (statuses with no rows left out)."""
    blank = pd.Series([""] * len(table), index=table.index)
    reason = table[REASON] if REASON in table else blank
    error = table[ERROR] if ERROR in table else blank
    kind = table[ERROR_KIND] if ERROR_KIND in table else blank
    c = Counter(status(str(d), str(r), str(e), str(k)) for d, r, e, k in zip(
        table[DECISION].fillna(""), reason.fillna(""), error.fillna(""), kind.fillna("")))
    return {k: c[k] for k in (*ORDER, *sorted(set(c) - set(ORDER))) if c[k]}


def slowest(paths: list[Path], slide_size: int, slide_cache: Path, k: int = 5) -> list[dict]:
    """The ``k`` slides whose thumbnails took longest to read (as recorded when rendered)."""
    records = []
    for p in paths:
        rec = slides.read_record(p, slide_size, slide_cache)
        if rec is not None:
            records.append({**rec, "path": str(p)})
    return sorted(records, key=lambda r: -float(r.get("seconds", 0)))[:k]


def _how(rec: dict) -> str:
    scale = rec.get("dct_scale", 1)
    return f"{rec.get('reader', '?')}, level {rec.get('level', 0)}" + (
        f" at 1/{scale}" if scale and scale > 1 else "")


def closing_note(table: pd.DataFrame, slow: list[dict]) -> str:
    """The console's last line: counts by status and the slowest slides."""
    parts = ", ".join(f"{n} {s}" for s, n in counts(table).items())
    note = f"every input accounted for: {len(table)} row{'s' * (len(table) != 1)} = {parts}"
    if slow:
        note += "; slowest slides: " + ", ".join(
            f"{Path(r['path']).name} {float(r['seconds']):.2f} s ({_how(r)})" for r in slow)
    return note


def read_summary(table: pd.DataFrame) -> str:
    """One line on how the slides were read (issue 30): readers, where the MPP came from,
    bytes and seconds, levels skipped; empty without slides."""
    if READ_READER not in table:
        return ""
    read = table[table[READ_READER].fillna("").astype(str) != ""]
    if read.empty:
        return ""
    readers = ", ".join(f"{k} {v}" for k, v in read[READ_READER].value_counts().items())
    source = read[READ_MPP_SOURCE].fillna("").astype(str)
    mpp = ", ".join(f"{s} {int((source == s).sum())}" for s in (MPP_HEADER, MPP_OVERRIDE, MPP_NONE)
                    if (source == s).any())
    nbytes = pd.to_numeric(read[READ_BYTES], errors="coerce").sum()
    secs = pd.to_numeric(read[READ_SECONDS], errors="coerce").sum()
    skipped = int((read[READ_NOTE].fillna("").astype(str) != "").sum())
    return (f"{len(read)} slides read ({readers}); MPP from {mpp}; {nbytes / 1e6:.1f} MB read "
            f"in {secs:.1f} s" + (f"; {skipped} read from another level because one was "
                                  "corrupt (see read_note)" if skipped else ""))


def section(table: pd.DataFrame, slow: list[dict]) -> tuple[str, str]:
    """The report's closing section: the same counts and slowest slides, as tables."""
    rows = "".join(f"<tr><td>{html.escape(s)}</td><td>{n}</td></tr>"
                   for s, n in counts(table).items())
    body = (f"<p>{len(table)} inputs, one row each in predictions.csv (the error column says "
            "why a row could not be read).</p>"
            f"<table><tr><th>status</th><th>rows</th></tr>{rows}</table>")
    if read_summary(table):
        body += f"<p>How the slides were read: {html.escape(read_summary(table))}.</p>"
    if slow:
        body += ("<p>Slowest slides to read (seconds when their thumbnail was rendered; later "
                 "steps and runs reuse it):</p><table><tr><th>slide</th><th>seconds</th>"
                 "<th>read as</th></tr>" + "".join(
                     f"<tr><td>{html.escape(r['path'])}</td><td>{float(r['seconds']):.2f}</td>"
                     f"<td>{html.escape(_how(r))}</td></tr>" for r in slow) + "</table>")
    return "Every input accounted for", body
