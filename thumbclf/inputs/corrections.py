"""Corrections: reviewed labels (tables of PATH, CLASSIFICATION, as the review page exports them)
that override the labels of the same slides and add slides to a training set.

A correction matches a sample by its resolved path. ``Undecided`` as a correction means "looked
at, left Undecided": it changes no label and adds no slide.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from thumbclf.core.decide import UNDECIDED
from thumbclf.core.errors import DataError
from thumbclf.core.layout import to_local_path, web_url
from thumbclf.inputs.samples import Sample, SampleSet, has_column, read_table
from thumbclf.core.table import LABEL, PATH, PATIENT

log = logging.getLogger(__name__)
SHOWN = 5  # rows named in one message


@dataclass(frozen=True)
class Correction:
    """One reviewed label: the slide (resolved against its table's folder), the class, where."""

    path: Path
    label: str
    source: Path
    row: int
    patient: str | None = None
    reviewer: str = ""
    reviewed_at: str = ""

    @property
    def key(self) -> str:
        return resolved_key(self.path)

    @property
    def where(self) -> str:
        return f"{self.source} row {self.row}"


def resolved_key(path: Path | str) -> str:
    """How a correction and a sample are matched: the path, resolved (a DICOMweb URL as it is)."""
    return web_url(path) or str(Path(path).resolve())


def _rows(items: Sequence[Correction]) -> str:
    shown = ", ".join(f"{c.where} ({c.path})" for c in items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def read_table_of(path: Path) -> list[Correction]:
    """The corrections of one table (CSV/TSV/Excel with PATH and CLASSIFICATION)."""
    if not path.is_file():
        raise DataError(f"{path}: corrections table not found; check the path (relative paths "
                        "start at the experiment file's folder)")
    df = read_table(path)
    cols = {c.upper(): c for c in df.columns}
    missing = [name for name in (PATH, LABEL) if not has_column(df, name)]
    if missing:
        raise DataError(f"{path}: no {' or '.join(missing)} column (columns: "
                        f"{', '.join(df.columns) or 'none'}); a corrections table has PATH and "
                        "CLASSIFICATION, as the review page exports it")
    out, empty = [], []
    for i, rec in enumerate(df.to_dict("records")):
        text, label = str(rec[cols[PATH]]).strip(), str(rec[cols[LABEL]]).strip()
        cell = lambda name: str(rec[cols[name]]).strip() if name in cols else ""  # noqa: E731
        patient = cell(PATIENT) or None
        if not text or not label:
            empty.append(i + 2)
            continue
        out.append(Correction(to_local_path(text, path.parent), label, path, i + 2, patient,
                              cell("REVIEWER"), cell("REVIEWED_AT")))
    if empty:
        raise DataError(f"{path}: rows {', '.join(map(str, empty[:SHOWN]))}: PATH or "
                        "CLASSIFICATION is empty; fill them in or delete the rows")
    return out


def _present(path: Path) -> bool:
    """Whether a file is there (a DICOMweb series: asked of its server when read); False (not
    an OSError) for a name too long to exist."""
    try:
        return web_url(path) is not None or path.exists()
    except OSError:  # ENAMETOOLONG: over 255 bytes in one part (issue 33)
        return False


def read_corrections(tables: Sequence[Path]) -> list[Correction]:
    """Every correction of ``tables``, checked: each file exists, no two corrections of one
    slide disagree (DataError naming the rows otherwise). Repeats of one label count once."""
    found = [c for t in tables for c in read_table_of(Path(t))]
    missing = [c for c in found if not _present(c.path)]
    if missing:
        long = any(len(part.encode("utf-8", "surrogateescape")) > 255 for c in missing
                   for part in c.path.parts)
        raise DataError(f"corrections: {len(missing)} file{'s' if len(missing) > 1 else ''} not "
                        f"found: {_rows(missing)}"
                        f"{' (a name over 255 bytes cannot exist on the file system)' if long else ''}"
                        "; fix the PATH or delete the row")
    by_key: dict[str, list[Correction]] = {}
    for c in found:
        by_key.setdefault(c.key, []).append(c)
    clashes = [group for group in by_key.values() if len({c.label for c in group}) > 1]
    if clashes:
        shown = "; ".join(" vs ".join(f"{c.where} says {c.label!r}" for c in group)
                          + f" for {group[0].path}" for group in clashes[:SHOWN])
        raise DataError(f"corrections disagree for {len(clashes)} slide"
                        f"{'s' if len(clashes) > 1 else ''}: {shown}; keep one label per slide")
    return [group[0] for group in by_key.values()]


@dataclass(frozen=True)
class Applied:
    """What the corrections did to a training set."""

    changed: int = 0
    added: int = 0
    confirmed: int = 0
    left_undecided: int = 0
    tables: int = 0

    def sentence(self) -> str:
        """One line for the log and the training report."""
        return (f"Corrections ({self.tables} table{'s' if self.tables != 1 else ''}): "
                f"{self.changed} labels changed, {self.added} slides added, {self.confirmed} "
                f"labels confirmed, {self.left_undecided} left Undecided (not used).")


def _check_new_classes(sample_set: SampleSet, samples: list[Sample],
                       corrections: Sequence[Correction], min_images: int) -> None:
    """DataError naming the rows where the corrections bring a class the training table does
    not have, with fewer images of it than training needs."""
    counts = Counter(s.label for s in samples)
    new = [c for c in corrections if c.label != UNDECIDED and c.label not in sample_set.classes
           and counts[c.label] < min_images]
    if new:
        raise DataError(f"corrections: {_rows(new)} adds the class {new[0].label!r}, which "
                        f"{sample_set.source} does not have, with {counts[new[0].label]} image(s); "
                        f"training needs at least {min_images} per class: correct the label, or "
                        "add images of that class")


def apply_corrections(sample_set: SampleSet, corrections: Sequence[Correction], *,
                      target_labels: tuple[str, ...] | None = None,
                      tables: int = 1, min_images: int = 1) -> tuple[SampleSet, Applied]:
    """The samples with the corrections' labels: a corrected slide keeps its patient and place,
    a slide not in the samples is added at the end (its patient from the table's PATIENT
    column, else its own). Labels outside ``target_labels`` are refused, naming the rows; so is
    a class only the corrections bring, with fewer than ``min_images`` images (issue 33: the
    training table was blamed)."""
    if target_labels is not None:
        outside = [c for c in corrections if c.label != UNDECIDED and c.label not in target_labels]
        if outside:
            raise DataError(f"corrections: labels not in target_labels "
                            f"({', '.join(target_labels)}): {_rows(outside)} says "
                            f"{outside[0].label!r}; correct the label or add it to target_labels")
    index = {resolved_key(s.path): i for i, s in enumerate(sample_set.samples)}
    samples = list(sample_set.samples)
    counts: Counter[str] = Counter()
    added = []
    for c in corrections:
        if c.label == UNDECIDED:
            counts["left_undecided"] += 1
            continue
        i = index.get(c.key)
        if i is None:
            added.append(Sample(c.path, c.label, c.patient, None))
            counts["added"] += 1
        elif samples[i].label != c.label:
            samples[i] = replace(samples[i], label=c.label)
            counts["changed"] += 1
        else:
            counts["confirmed"] += 1
    samples += added
    _check_new_classes(sample_set, samples, corrections, min_images)
    present = {s.label for s in samples if s.label is not None}
    classes = tuple(target_labels) if target_labels is not None else tuple(sorted(present))
    has_patients = sample_set.has_patients or any(s.patient for s in added)
    applied = Applied(counts["changed"], counts["added"], counts["confirmed"],
                      counts["left_undecided"], tables)
    return SampleSet(tuple(samples), classes, has_patients, sample_set.source), applied
