"""The predictions table: its columns, how it is read back, and how it is validated.

Columns, in order: PATH, row (tables only), CLASSIFICATION (with labels), PATIENT (with
patients), SOURCE (where the inputs give one), fold (cross-validation), one probability column
per class (in the model's class order), model_prediction, undecided_reason ('no tissue',
'unfamiliar', 'low confidence' or empty), unfamiliarity and its two parts
unfamiliarity_content and unfamiliarity_look (models with the unfamiliar-slide rule; above 1:
unfamiliar), tissue_fraction, error (deploy), threshold, then the slide columns and the read
record (slides only).
Class columns are found by name, never by position: from the model's classes where they are
known, else as the columns that are none of the table's own.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from thumbclf.core.decide import UNDECIDED
from thumbclf.core.errors import DataError, error_kind

PATH, ROW, LABEL, PATIENT, FOLD = "PATH", "row", "CLASSIFICATION", "PATIENT", "fold"
DECISION, ERROR, THRESHOLD = "model_prediction", "error", "threshold"
ERROR_KIND = "error_kind"  # why a row could not be read, as a code: errors.ERROR_KINDS
REASON, UNFAMILIARITY = "undecided_reason", "unfamiliarity"  # familiarity.py
# the unfamiliarity's two parts (features, look) and the tissue fraction (look.py)
UNFAMILIAR_CONTENT, UNFAMILIAR_LOOK = "unfamiliarity_content", "unfamiliarity_look"
TISSUE = "tissue_fraction"
SIGNALS = (UNFAMILIARITY, UNFAMILIAR_CONTENT, UNFAMILIAR_LOOK, TISSUE)  # in the table's order
SOURCE = "SOURCE"  # optional: the site, scanner or collection a slide came from
SLIDE_MPP_X, SLIDE_WIDTH = "slide_mpp_x", "slide_width"
SLIDE_COLUMNS = ("slide_vendor", "slide_objective_power", SLIDE_MPP_X, "slide_mpp_y",
                 "slide_level_count", SLIDE_WIDTH, "slide_height")
# --- the read record (issue 30): how each slide's thumbnail was read; slides only -----------
READ_READER, READ_LEVEL = "read_reader", "read_level"
READ_LEVEL_WIDTH, READ_LEVEL_HEIGHT = "read_level_width", "read_level_height"
READ_MPP, READ_MPP_SOURCE = "read_mpp", "read_mpp_source"
READ_PHOTOMETRIC, READ_BYTES, READ_SECONDS = "read_photometric", "read_bytes", "read_seconds"
READ_NOTE = "read_note"
READ_COLUMNS = (READ_READER, READ_LEVEL, READ_LEVEL_WIDTH, READ_LEVEL_HEIGHT, READ_MPP,
                READ_MPP_SOURCE, READ_PHOTOMETRIC, READ_BYTES, READ_SECONDS, READ_NOTE)
READ_TEXT_COLUMNS = (READ_READER, READ_MPP_SOURCE, READ_PHOTOMETRIC, READ_NOTE)
READ_INT_COLUMNS = (READ_LEVEL, READ_LEVEL_WIDTH, READ_LEVEL_HEIGHT, READ_BYTES)  # 'Int64': no .0
MPP_HEADER, MPP_OVERRIDE, MPP_NONE = "header", "override", "none"  # read_mpp_source values
MPP_INPUT = "MPP"  # optional column of an input table: the slide's microns per pixel (level 0)
# --- end of the read record -------------------------------------------------------------------
OWN_COLUMNS = {PATH, ROW, LABEL, PATIENT, SOURCE, FOLD, DECISION, REASON, *SIGNALS, ERROR,
               ERROR_KIND, THRESHOLD, "confidence", *SLIDE_COLUMNS, *READ_COLUMNS}
# class names become columns of the table: these cannot be class names
RESERVED = frozenset(OWN_COLUMNS | {UNDECIDED})
TEXT_COLUMNS = {PATH: str, LABEL: str, PATIENT: str, SOURCE: str, DECISION: str, REASON: str,
                ERROR: str, ERROR_KIND: str}
SUM_TOLERANCE = 1e-3  # probabilities are written with 6 significant digits
NUMERIC_COLUMNS = {ROW, FOLD, *SIGNALS, THRESHOLD, "confidence", "position",
                   *(c for c in SLIDE_COLUMNS if c != "slide_vendor"),
                   *(c for c in READ_COLUMNS if c not in READ_TEXT_COLUMNS)}
# A spreadsheet runs a cell starting with one of these as a formula (=HYPERLINK(...), +cmd|...)
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
QUOTE = "'"


# ---------------------------------------------------------------------------- CSV, both ways


def neutralise(cell):
    """A text cell a spreadsheet would run as a formula, with a leading quote (OWASP's rule),
    so it is shown as text. A cell that starts with the quote itself gets one more, so that
    ``unquote`` gives back exactly what was written. Numbers are unchanged."""
    if isinstance(cell, str) and cell.startswith((*FORMULA_START, QUOTE)):
        return QUOTE + cell
    return cell


def unquote(cell):
    """The text ``neutralise`` was given."""
    if isinstance(cell, str) and cell.startswith(QUOTE) and cell[1:2] and \
            cell[1:].startswith((*FORMULA_START, QUOTE)):
        return cell[1:]
    return cell


# A file name that is not UTF-8 (old archives) is held in Python with surrogate escapes, one
# per byte that is not text. A table shows each such byte as \xNN, so that every table is UTF-8
# that any reader takes, and the name can be told apart and given back exactly. A backslash of
# a name that would read as such an escape is written \x5c; every other backslash (Windows
# paths) is left alone.
_ESCAPE = re.compile(r"[\udc80-\udcff]|\\(?=x(?:5[cC]|[89a-fA-F][0-9a-fA-F]))")
_ESCAPED = re.compile(r"\\x(5[cC]|[89a-fA-F][0-9a-fA-F])")


def _escaped(m: re.Match) -> str:
    c = m.group()
    return "\\x5c" if c == "\\" else f"\\x{ord(c) - 0xDC00:02x}"


def _unescaped(m: re.Match) -> str:
    n = int(m.group(1), 16)
    return "\\" if n == 0x5C else chr(0xDC00 + n)


def escape(cell):
    """A text cell with the bytes of a name that is not UTF-8 shown as \\xNN (issue 33); other
    cells and numbers unchanged. ``unescape`` gives back exactly what was given."""
    if not isinstance(cell, str) or ("\\" not in cell and cell.isascii()):
        return cell
    return _ESCAPE.sub(_escaped, cell)


def unescape(cell):
    """The text ``escape`` was given."""
    if not isinstance(cell, str) or "\\x" not in cell:
        return cell
    return _ESCAPED.sub(_unescaped, cell)


def _out(cell):
    return neutralise(escape(cell))


def _in(cell):
    return unescape(unquote(cell))


def to_csv(df: pd.DataFrame) -> str:
    """The one CSV writer of thumbclf's tables: cells and headers neutralised and escaped
    (valid UTF-8 whatever the file names), no index."""
    out = df.copy()
    out.columns = [_out(str(c)) for c in out.columns]
    for j in range(out.shape[1]):
        if not pd.api.types.is_numeric_dtype(out.dtypes.iloc[j]):
            out.isetitem(j, text(map(_out, out.iloc[:, j]), out.index))
    buf = io.StringIO()
    out.to_csv(buf, index=False)
    return buf.getvalue()


def csv_rows(rows: Iterable[Sequence]) -> str:
    """Rows (lists of cells) as CSV text, cells neutralised and escaped as ``to_csv`` does."""
    buf = io.StringIO()
    csv.writer(buf).writerows([[_out(c) for c in row] for row in rows])
    return buf.getvalue()


def as_written(df: pd.DataFrame) -> pd.DataFrame:
    """A table read as text (CSV or a spreadsheet), with neutralised and escaped cells and
    headers given back as they were written."""
    df.columns = [_in(str(c)) for c in df.columns]
    for j in range(df.shape[1]):
        cells = list(map(unquote, df.iloc[:, j]))
        if any(isinstance(c, str) and "\\x" in c for c in cells):  # rare: escaped names
            cells = list(map(unescape, cells))
        df.isetitem(j, text(cells, df.index))
    return df


def read_csv(path: Path | io.StringIO, *, numeric: Iterable[str] | bool = (),
             usecols: Sequence[str] | None = None, sep: str = ",",
             encoding: str = "utf-8", nrows: int | None = None) -> pd.DataFrame:
    """The one CSV reader of every table: each cell as the text written ('NA', 'null' and
    'None' stay text, an empty cell is ''), neutralised cells given back as they were, and
    the ``numeric`` columns (True: all) as numbers (an empty or non-numeric cell: NaN)."""
    df = as_written(pd.read_csv(path, dtype=object, keep_default_na=False, na_filter=False,
                                sep=sep, encoding=encoding, usecols=usecols, nrows=nrows,
                                encoding_errors="surrogateescape"))
    wanted = df.columns if numeric is True else [c for c in (numeric or ()) if c in df.columns]
    for c in dict.fromkeys(wanted):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def text(values, index=None) -> pd.Series:
    """A column of text from data (names, labels, paths), as Python strings: any file name,
    including one that is not valid UTF-8 (kept with surrogate escapes), fits."""
    return pd.Series(list(values), dtype=object, index=index)


@dataclass(frozen=True)
class InputColumns:
    """The columns a predictions table takes from its inputs, one entry per input, in input
    order: ``paths`` (the PATH column, as written), and, where the table has them, the table
    rows, labels, patients and sources (None: no such column; a source column only where one
    input has a source); then what reading each input gave: its error ('' when readable), and
    for slides their properties (SLIDE_COLUMNS) and read record (READ_COLUMNS), None for a
    picture. ``inputs.samples.input_columns`` makes them from samples."""

    paths: Sequence[str]
    rows: Sequence[int | None] | None = None
    labels: Sequence[str | None] | None = None
    patients: Sequence[str] | None = None
    sources: Sequence[str] | None = None
    errors: Sequence[str] | None = None
    slide_properties: Sequence[dict | None] | None = None
    read_records: Sequence[dict | None] | None = None

    def __len__(self) -> int:
        return len(self.paths)


def build(inputs: InputColumns, probs: np.ndarray, classes: Sequence[str],
          decisions: Sequence[str], *, threshold: float, fold: int | None = None,
          reasons: Sequence[str] | None = None,
          signals: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """The predictions table of ``inputs`` (one row each, in order), in the documented column
    order. ``fold`` (cross-validation) adds the fold column; full training (fold 0) has none;
    ``signals``: the SIGNALS columns the decision step had (familiarity.ensemble_signals)."""
    # text as Python strings (object): file names that are not UTF-8 keep their surrogate
    # escapes, which pandas' pyarrow strings cannot hold
    df = pd.DataFrame({PATH: text(inputs.paths)})
    if inputs.rows is not None:
        df[ROW] = list(inputs.rows)
    if inputs.labels is not None:
        df[LABEL] = text(inputs.labels)
    if inputs.patients is not None:
        df[PATIENT] = text(inputs.patients)
    if inputs.sources is not None:
        df[SOURCE] = text(inputs.sources)
    if fold:
        df[FOLD] = fold
    probs = np.asarray(probs, dtype=float).reshape(len(inputs), len(classes))
    for j, c in enumerate(classes):
        df[c] = probs[:, j]
    df[DECISION] = list(decisions)
    if reasons is not None:
        df[REASON] = list(reasons)
    for col in SIGNALS:
        if signals is not None and signals.get(col) is not None:
            df[col] = np.asarray(signals[col], dtype=float)
    if inputs.errors is not None:
        df[ERROR] = list(inputs.errors)
        df[ERROR_KIND] = [error_kind(e) for e in inputs.errors]
    df[THRESHOLD] = threshold
    found = inputs.slide_properties
    if found is not None and any(p is not None for p in found):
        for col in SLIDE_COLUMNS:
            df[col] = [p[col] if p is not None else None for p in found]
    records = inputs.read_records
    if records is not None and any(r is not None for r in records):  # issue 30
        for col in READ_COLUMNS:
            values = [r.get(col) if r is not None else None for r in records]
            df[col] = pd.array(values, dtype="Int64") if col in READ_INT_COLUMNS else values
    return df


def reserved_names(classes: Iterable[str]) -> list[str]:
    """The class names that cannot be, because the table has a column of that name (or they
    name the Undecided decision)."""
    return sorted(set(classes) & RESERVED)


def check_class_names(classes: Iterable[str], source: Path | str) -> None:
    """Class names become column names: DataError naming ``source`` where one is a column of
    the table's own (or the Undecided decision)."""
    clash = reserved_names(classes)
    if clash:
        raise DataError(f"{source}: class names {', '.join(clash)} are reserved column names of "
                        "the predictions table; rename those classes")


def signal(df: pd.DataFrame, column: str) -> np.ndarray | None:
    """One of the SIGNALS columns as numbers (NaN where empty), or None where the table has
    none (older tables, a model without the rule)."""
    if column not in df.columns:
        return None
    return pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=float)


def read_fold(path: Path) -> pd.DataFrame:
    """A finished fold's predictions, as written (read back when resuming)."""
    df = read_csv(path)
    return read_csv(path, numeric=[*class_columns(df), *NUMERIC_COLUMNS])


def class_columns(df: pd.DataFrame) -> list[str]:
    """The probability columns of a table whose classes are not known otherwise."""
    return [c for c in df.columns if c not in OWN_COLUMNS]


def read(path: Path, classes: list[str] | tuple[str, ...] | None = None
         ) -> tuple[pd.DataFrame, list[str]]:
    """A predictions table and its classes, validated; DataError naming the file otherwise."""
    try:
        df = read_csv(path)
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; is it a thumbclf predictions.csv?") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a readable CSV table ({str(exc).splitlines()[0][:160]})"
                        ) from None
    twice = _repeated_headers(path)
    if twice:  # pandas would rename the second one 'A.1', a class of its own
        raise DataError(f"{path}: the columns {', '.join(twice)} appear twice; keep one of each")
    classes = list(classes) if classes is not None else class_columns(df)
    validate(df, classes, path)
    df = df.copy()
    for c in [*classes, *(NUMERIC_COLUMNS & set(df.columns))]:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df, classes


def _repeated_headers(path: Path) -> list[str]:
    """Header names that appear more than once in a CSV file."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        header = [_in(c) for c in next(csv.reader(f), [])]
    return sorted({c for c in header if header.count(c) > 1})


def _rows(mask: np.ndarray, df: pd.DataFrame) -> str:
    """Table row numbers (header = row 1) of the first few rows in ``mask``."""
    idx = np.flatnonzero(mask)
    shown = ", ".join(str(int(i) + 2) for i in idx[:5])
    return f"row{'s' if len(idx) > 1 else ''} {shown}{', ...' if len(idx) > 5 else ''}"


def validate(df: pd.DataFrame, classes: list[str], source: Path | str,
             *, need_labels: bool = False) -> None:
    """Required columns present; class columns numeric, finite, in [0, 1] and summing to 1 on
    every readable row. DataError listing every problem otherwise."""
    problems = []
    for col in (PATH, DECISION) + ((LABEL,) if need_labels else ()):
        if col not in df.columns:
            problems.append(f"no {col} column; is it a thumbclf predictions.csv?")
    if len(classes) < 2:
        problems.append(f"found {len(classes)} class probability columns "
                        f"({', '.join(classes) or 'none'}); a predictions table has one per class")
    missing = [c for c in classes if c not in df.columns]
    if missing:
        problems.append(f"no probability column for the classes {', '.join(missing)}")
    if problems:
        raise DataError(*(f"{source}: {p}" for p in problems))
    ok = (df[ERROR].fillna("") == "").to_numpy() if ERROR in df.columns else np.ones(len(df), bool)
    probs = df[classes].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    for j, c in enumerate(classes):
        bad = ok & ~np.isfinite(probs[:, j])
        if bad.any():
            problems.append(f"column {c}: {bad.sum()} values are not numbers ({_rows(bad, df)}); "
                            "probabilities must be numbers between 0 and 1")
        out = ok & np.isfinite(probs[:, j]) & ((probs[:, j] < 0) | (probs[:, j] > 1))
        if out.any():
            problems.append(f"column {c}: {out.sum()} values lie outside 0-1 ({_rows(out, df)})")
    for col in (c for c in SIGNALS if c in df.columns):  # 'nan' here would make an
        # unfamiliar or blank slide decided when the table is evaluated again
        u = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
        given = (df[col].astype(str).str.strip() != "").to_numpy()  # empty: rule off
        bad = ok & given & ~(np.isfinite(u) & (u >= 0))
        if bad.any():
            problems.append(f"column {col}: {bad.sum()} values are not numbers of 0 or "
                            f"more ({_rows(bad, df)}); leave it empty where the rule was off")
    if not problems:
        sums = probs[ok].sum(axis=1)
        off = np.zeros(len(df), bool)
        off[np.flatnonzero(ok)] = np.abs(sums - 1) > SUM_TOLERANCE
        if off.any():
            problems.append(f"the class probabilities of {off.sum()} rows do not sum to 1 "
                            f"({_rows(off, df)}: {probs[off].sum(axis=1)[0]:.3f}); is a class "
                            f"column missing or extra? (classes: {', '.join(classes)})")
    if problems:
        raise DataError(*(f"{source}: {p}" for p in problems))


def strings(values) -> list[str]:
    """The cells as Python strings, names that are not UTF-8 included (pandas' astype(str)
    refuses their surrogate escapes under its pyarrow strings: issue 33)."""
    return [str(v) for v in values]
