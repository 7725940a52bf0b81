"""The review journal: the corrections made on the served page, one JSON object a line,
appended and never cut (a torn or foreign line is skipped when read, never removed).

Each entry has a sequence number given by the page (``seq``, increasing with each key press):
the last word on a slide is its entry with the highest sequence, whatever order the requests
arrived in; appends are serialised.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pandas as pd

from thumbclf.core import layout
from thumbclf.core import table as table_io
from thumbclf.core.errors import OutputError
from thumbclf.core.files import NOFOLLOW, append_whole
from thumbclf.core.table import LABEL, PATH

FIELDS = ("path", "classification", "reviewer", "at", "seq")
COLUMNS = [PATH, LABEL, "REVIEWER", "REVIEWED_AT", "MODEL_PREDICTION"]
MAX_SEQ = 2 ** 53  # what a browser's numbers hold exactly
_APPENDS = threading.Lock()


def _entry(raw: bytes) -> dict | None:
    """One line's entry, or None for a torn, foreign or null line."""
    try:
        e = json.loads(raw.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(e, dict) or not isinstance(e.get("path"), str):
        return None
    if e.get("classification") is not None and not isinstance(e["classification"], str):
        return None
    return e


def _seq(entry: dict) -> int:
    seq = entry.get("seq")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else 0  # older entries first


def read(journal: Path) -> list[dict]:
    """The journal's entries in sequence order (equal sequences: in the file's order). Lines
    are split on "\\n" only: U+2028, U+2029 and U+0085 inside an entry are text."""
    try:
        fd = os.open(journal, os.O_RDONLY | NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise OutputError(f"{journal}: cannot read the review journal ({exc.strerror or exc}); "
                          "remove it if it is a link") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OutputError(f"{journal}: is not a plain file; remove it")
        data = f.read()
    entries = [e for e in map(_entry, data.split(b"\n")) if e is not None]
    return sorted(entries, key=_seq)


def append(journal: Path, entry: dict) -> None:
    """Append one entry as its own line (after a last line without newline, not onto it), one
    append at a time."""
    line = json.dumps(entry, ensure_ascii=False) + "\n"
    with _APPENDS:
        append_whole(journal, line.encode("utf-8", "surrogateescape"), own_line=True,
                     then="reload the page: it sends the corrections the journal lacks again")


def corrections(entries: list[dict], table: pd.DataFrame) -> pd.DataFrame:
    """The journal's last word on each slide, as corrections.csv (in the table's order)."""
    last: dict[str, dict] = {}
    for e in entries:  # in sequence order
        if e.get("classification") is None:
            last.pop(e["path"], None)
        else:
            last[e["path"]] = e
    rows = []
    for path, decision in zip(table_io.strings(table[table_io.PATH]), table[table_io.DECISION]):
        e = last.get(layout.input_text(path))
        if e:
            rows.append([e["path"], e["classification"], str(e.get("reviewer", "")),
                         str(e.get("at", "")), decision])
    return pd.DataFrame(rows, columns=COLUMNS)
