"""Find the inputs: a table or a folder -> a list of samples (path, label, patient, row)."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from thumbclf.core import layout
from thumbclf.core.errors import DataError
from thumbclf.core.layout import to_local_path
from thumbclf.core.table import (LABEL, MPP_INPUT, PATH, PATIENT, SOURCE, InputColumns,
                                 as_written, read_csv)
from thumbclf.inputs import dicomweb
from thumbclf.inputs.dicom import group_folders

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
# files that slide formats keep beside the slide (Hamamatsu .vms: its .opt map; labels and
# tables of the lab): not counted as files left out
COMPANION_SUFFIXES = (".opt", ".csv", ".tsv", ".xlsx", ".yaml", ".yml", ".json")
SLIDE_SUFFIXES = (".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm")
INPUT_SUFFIXES = IMAGE_SUFFIXES + SLIDE_SUFFIXES
TABLE_SUFFIXES = (".csv", ".tsv", ".xlsx", ".xls")


@dataclass(frozen=True)
class Sample:
    """One input image or slide; ``row`` is the table's row number (header = row 1)."""

    path: Path
    label: str | None = None
    patient: str | None = None
    row: int | None = None
    source: str | None = None  # the SOURCE column: site, scanner or collection (per-source figures)
    mpp: float | None = None  # microns per pixel from the input table's MPP column (issue 30)

    @property
    def where(self) -> str:
        """How to name this sample in a message: its table row, or its path."""
        return f"row {self.row} ({self.path})" if self.row is not None else str(self.path)


@dataclass(frozen=True)
class SampleSet:
    """The samples of a run, the classes in output order, and whether patients were given."""

    samples: tuple[Sample, ...]
    classes: tuple[str, ...]
    has_patients: bool
    source: Path
    other_files: int = 0  # files of a folder input that are not images or slides, left out

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[str | None]:
        return [s.label for s in self.samples]

    def patients(self) -> list[str] | None:
        """Each sample's patient (a slide without one: its own path), as the folds group them;
        None where the inputs have no patients."""
        return [s.patient or str(s.path) for s in self.samples] if self.has_patients else None

    def counts(self) -> dict[str, int]:
        """Images per class, in class order."""
        c = Counter(self.labels)
        return {k: c.get(k, 0) for k in self.classes}


def is_input_file(path: Path) -> bool:
    """True for a visible file with an image or slide extension."""
    return (path.suffix.lower() in INPUT_SUFFIXES and not path.name.startswith(".")
            and path.is_file())


@dataclass
class _Skipped:
    """Folders that folder inputs leave out: thumbclf results and caches (never inputs)."""

    exclude: tuple[Path, ...] = ()
    folders: list[Path] = field(default_factory=list)
    files: int = 0
    others: Counter = field(default_factory=Counter)  # other files left out, by suffix

    def count_others(self, here: Path, filenames: list[str]) -> None:
        """Visible files that are neither images nor slides (a MIRAX slide's data folder and
        the files a slide format keeps beside it are part of their slide)."""
        if here.with_suffix(".mrxs").is_file() or here.with_suffix(".MRXS").is_file():
            return
        self.others.update(Path(f).suffix.lower() or "(no extension)" for f in filenames
                           if not f.startswith(".") and Path(f).suffix.lower() not in
                           INPUT_SUFFIXES + COMPANION_SUFFIXES)

    def skip(self, folder: Path) -> bool:
        resolved = folder.resolve()
        if (any(resolved == e for e in self.exclude) or layout.is_results_folder(folder)
                or layout.is_cache_folder(folder)):
            self.folders.append(folder)
            self.files += sum(1 for p in folder.rglob("*") if is_input_file(p))
            return True
        return False


def _find_files(folder: Path, skipped: _Skipped) -> list[Path]:
    found = []

    def unreadable(exc: OSError) -> None:
        log.warning("%s: cannot read this folder (%s); its images are left out",
                    exc.filename, exc.strerror or exc)

    seen: set[Path] = set()  # linked subfolders are followed, each folder read once (no loops)
    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable, followlinks=True):
        here = Path(dirpath)
        seen.add(here.resolve())
        above = {p.resolve() for p in (here.absolute(), *here.absolute().parents)} | seen
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (here / d).resolve() not in above and not skipped.skip(here / d))
        found += [here / f for f in filenames if is_input_file(here / f)]
        skipped.count_others(here, filenames)
    return group_folders(found)  # a folder of .dcm files is one DICOM slide


MAX_UNPACKED_TABLE_BYTES = 256_000_000  # a spreadsheet of 100,000 rows unpacks to ~30 MB


def check_unpacked_size(path: Path, limit: int | None = None) -> None:
    """A spreadsheet (a zip of XML files) whose parts unpack to more than ``limit`` bytes is
    refused before it is read: a 1 MB file can inflate to gigabytes in memory. The sizes are
    the zip's own records, which Python's zip reader also holds each part to."""
    import zipfile

    limit = limit or MAX_UNPACKED_TABLE_BYTES
    try:
        with zipfile.ZipFile(path) as z:
            total = sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, OSError):
        return  # not a zip (e.g. an old .xls): the reader reports it
    if total > limit:
        raise DataError(f"{path}: the spreadsheet unpacks to {total:,} bytes, more than "
                        f"{limit:,}; save it as CSV, or split it")


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV/TSV/Excel table with every cell as text."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv") and not path.read_text(encoding="utf-8-sig",
                                                              errors="replace").strip():
            raise pd.errors.EmptyDataError
        if suffix == ".csv":
            first = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()[0]
            sep = max((",", ";", "\t"), key=first.count)  # European Excel writes ';'
            df = read_csv(path, sep=sep, encoding="utf-8-sig")
        elif suffix == ".tsv":
            df = read_csv(path, sep="\t", encoding="utf-8-sig")
        else:
            check_unpacked_size(path)
            df = as_written(pd.read_excel(path, dtype=object, keep_default_na=False,
                                          na_filter=False))
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the table is empty; it needs a header row with PATH and "
                        "CLASSIFICATION and one row per image") from None
    except Exception as exc:  # pandas raises many types for unreadable files
        raise DataError(f"{path}: cannot read the table ({type(exc).__name__}: {exc})") from exc
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _column(df: pd.DataFrame, name: str) -> str | None:
    matches = [c for c in df.columns if c.upper() == name]
    return matches[0] if matches else None


def _samples_from_table(path: Path, need_labels: bool) -> tuple[list[Sample], bool]:
    return _samples_from_frame(read_table(path), path, path.parent, need_labels)


def _samples_from_frame(df: pd.DataFrame, path: Path, base: Path,
                        need_labels: bool) -> tuple[list[Sample], bool]:
    path_col, label_col, patient_col, source_col = (
        _column(df, n) for n in (PATH, LABEL, PATIENT, SOURCE))
    mpp_col = _column(df, MPP_INPUT)
    problems = []  # every problem of the table at once
    if path_col is None:
        problems.append(f"{path}: no PATH column (columns: {', '.join(df.columns) or 'none'}); "
                        "add a column PATH with the image or slide paths")
    if need_labels and label_col is None:
        problems.append(f"{path}: no CLASSIFICATION column (columns: "
                        f"{', '.join(df.columns) or 'none'}); add the labels, or set hasLabels: "
                        "false to deploy without them")
    if problems:
        raise DataError(*problems)
    if df.empty:
        raise DataError(f"{path}: the table has a header but no rows")
    samples = []
    for i, rec in enumerate(df.to_dict("records")):
        row = i + 2
        text = str(rec[path_col]).strip()
        if not text:
            problems.append(f"{path}: row {row}: PATH is empty; fill it in or delete the row")
            continue
        label = str(rec[label_col]) if label_col else None
        patient = str(rec[patient_col]).strip() if patient_col else None
        source = str(rec[source_col]).strip() if source_col else None
        try:
            mpp = _mpp(rec[mpp_col], path, row) if mpp_col else None
        except DataError as exc:
            problems.extend(exc.args)
            continue
        if problem := dicomweb.url_problem(text, f"{path}: row {row}"):
            problems.append(problem)
            continue
        samples.append(Sample(to_local_path(text, base), label, patient or None, row,
                              source=source or None, mpp=mpp))
    if problems:
        raise DataError(*capped(problems))
    return _web_series(samples, path), patient_col is not None


def _web_series(samples: list[Sample], source: Path) -> list[Sample]:
    """A row whose PATH names a DICOMweb service or study becomes one row per slide (series)
    in it, each with the row's label, patient, source and MPP (issue 30)."""
    out = []
    for s in samples:
        urls = dicomweb.series_urls(s.path, f"{source}: {s.where}")
        out += [s] if urls is None else [replace(s, path=Path(u)) for u in urls]
    return out


MAX_LINES = 20  # problems listed one per line; the rest counted


def capped(problems: list[str]) -> list[str]:
    """At most MAX_LINES problems, then how many more there are."""
    if len(problems) <= MAX_LINES:
        return problems
    return [*problems[:MAX_LINES], f"... and {len(problems) - MAX_LINES} more like these"]


def _mpp(value, path: Path, row: int) -> float | None:
    """An MPP cell: empty (the slide's header says) or a positive number of microns per pixel."""
    text = str(value).strip()
    if not text:
        return None
    try:
        mpp = float(text)
    except ValueError:
        mpp = -1.0
    if not (0 < mpp < 1e4):
        raise DataError(f"{path}: row {row}: {MPP_INPUT} must be the slide's microns per pixel "
                        f"(a positive number such as 0.25) or empty; got {text!r}")
    return mpp


def _samples_from_folder(folder: Path, need_labels: bool, skipped: _Skipped) -> list[Sample]:
    if not need_labels:
        files = _find_files(folder, skipped) if not skipped.skip(folder) else []
        if not files:
            raise DataError(f"{folder}: no images or slides found (searched recursively for "
                            f"{', '.join(INPUT_SUFFIXES)}, leaving out thumbclf results and "
                            "cache folders)")
        return [Sample(p) for p in files]
    top_files = [p for p in sorted(folder.iterdir()) if is_input_file(p)]
    if top_files:
        raise DataError(f"{folder}: has images directly inside (e.g. {top_files[0].name}); for "
                        "labelled input put them into one subfolder per class, or set "
                        "hasLabels: false")
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and not skipped.skip(p))
    samples = [Sample(p, d.name) for d in subdirs for p in _find_files(d, skipped)]
    if not samples:
        raise DataError(f"{folder}: no images found; expected one subfolder per class with "
                        f"images ({', '.join(INPUT_SUFFIXES)}) inside")
    return samples


def _normalise_labels(samples: list[Sample], source: Path,
                      target_labels: tuple[str, ...] | None) -> list[Sample]:
    stripped = sum(1 for s in samples if s.label is not None and s.label != s.label.strip())
    if stripped:
        log.warning("%s: removed stray spaces around %d labels", source, stripped)
    samples = [replace(s, label=s.label.strip()) if s.label is not None else s
               for s in samples]
    empty = [s for s in samples if s.label == ""]
    if empty:
        rows = ", ".join(s.where for s in empty[:3])
        log.warning("%s: left out %d images without a label (%s%s)", source, len(empty), rows,
                    ", ..." if len(empty) > 3 else "")
        samples = [s for s in samples if s.label != ""]
    if target_labels is None:
        return samples
    wanted = set(target_labels)
    folded = {t.casefold(): t for t in target_labels}
    near = sorted({s.label for s in samples
                   if s.label not in wanted and s.label.casefold() in folded})
    if near:
        pairs = ", ".join(f"{lab!r} (target_labels has {folded[lab.casefold()]!r})" for lab in near)
        raise DataError(f"{source}: labels differ from target_labels only in upper/lower case: "
                        f"{pairs}; write them exactly as in target_labels")
    other = Counter(s.label for s in samples if s.label not in wanted)
    if other:
        log.info("%s: left out %d images with labels not in target_labels: %s", source,
                 sum(other.values()), ", ".join(f"{k} ({v})" for k, v in sorted(other.items())))
    return [s for s in samples if s.label in wanted]


def _identity(path: Path) -> str:
    """The file a path names (links resolved); the path itself where it names none, even
    where the system refuses to look it up (a name over 255 bytes: that row's error says so)."""
    try:
        return str(path.resolve()) if path.exists() else str(path)
    except OSError:
        return str(path)


def _drop_duplicates(samples: list[Sample], source: Path) -> list[Sample]:
    seen: dict[str, Sample] = {}
    kept, dupes, clashes = [], [], []
    for s in samples:
        key = _identity(s.path)
        first = seen.get(key)
        if first is None:
            seen[key] = s
            kept.append(s)
            continue
        if first.label != s.label:
            clashes.append(f"{source}: {s.where} repeats {first.where} with another label "
                           f"({s.label!r} vs {first.label!r}); keep one of them")
        dupes.append(s)
    if clashes:  # all of them at once
        raise DataError(*capped(clashes))
    if dupes:
        log.warning("%s: %d duplicate rows ignored (first: %s); each image counts once",
                    source, len(dupes), dupes[0].where)
    return kept


def check_input(thumb_data: Path) -> None:
    """DataError unless ``thumb_data`` is a folder, a table or a DICOMweb URL."""
    if dicomweb.is_url(thumb_data):
        return dicomweb.check_url(str(thumb_data), "thumbData")
    if thumb_data.is_dir():
        return
    if not thumb_data.is_file():
        raise DataError(f"{thumb_data}: thumbData not found; check the path (relative paths "
                        "start at the experiment file's folder)")
    if thumb_data.suffix.lower() not in TABLE_SUFFIXES:
        raise DataError(f"{thumb_data}: thumbData must be a folder or a table "
                        f"({', '.join(TABLE_SUFFIXES)})")


def discover(thumb_data: Path, *, need_labels: bool,
             target_labels: tuple[str, ...] | None = None,
             exclude: tuple[Path, ...] = ()) -> SampleSet:
    """Find the samples at ``thumb_data`` (table or folder) and the classes in output order.

    A folder input never includes ``exclude`` (the run's own results and cache folders) nor any
    thumbclf results or cache folder inside it.
    """
    check_input(thumb_data)
    has_patients = False
    if dicomweb.is_url(thumb_data):  # a DICOMweb service, study or series: no labels
        samples = [Sample(Path(u)) for u in dicomweb.thumb_data_series(thumb_data, need_labels)]
        return _sample_set(samples, False, thumb_data, need_labels, target_labels)
    if thumb_data.is_dir():
        skipped = _Skipped(tuple(p.resolve() for p in exclude))
        samples = _samples_from_folder(thumb_data, need_labels, skipped)
        if skipped.folders:
            log.info("%s: left out %d files in %d thumbclf results or cache folders (%s)",
                     thumb_data, skipped.files, len(skipped.folders),
                     ", ".join(str(p) for p in skipped.folders[:3]))
        if skipped.others:
            log.info("%s: left out %d files that are not images or slides (%s)", thumb_data,
                     sum(skipped.others.values()), ", ".join(
                         f"{k} {v}" for k, v in sorted(skipped.others.items(),
                                                      key=lambda kv: (-kv[1], kv[0]))[:5]))
        sample_set = _sample_set(samples, False, thumb_data, need_labels, target_labels)
        return dataclasses.replace(sample_set, other_files=sum(skipped.others.values()))
    else:
        samples, has_patients = _samples_from_table(thumb_data, need_labels)
    return _sample_set(samples, has_patients, thumb_data, need_labels, target_labels)


def samples_from_frame(df: pd.DataFrame, *, source: Path, base: Path, need_labels: bool,
                       target_labels: tuple[str, ...] | None = None) -> SampleSet:
    """The samples of a table already in memory (cells as text), read as a table file would
    be; relative paths start at ``base``, messages name ``source``."""
    samples, has_patients = _samples_from_frame(df, source, base, need_labels)
    return _sample_set(samples, has_patients, source, need_labels, target_labels)


def has_column(df: pd.DataFrame, name: str) -> bool:
    """True when the table has the column ``name`` (upper case), in any case."""
    return _column(df, name) is not None


def _sample_set(samples: list[Sample], has_patients: bool, thumb_data: Path, need_labels: bool,
                target_labels: tuple[str, ...] | None) -> SampleSet:
    if need_labels:
        samples = _normalise_labels(samples, thumb_data, target_labels)
    samples = _drop_duplicates(samples, thumb_data)
    if not samples:
        raise DataError(f"{thumb_data}: no usable images left (check target_labels)")
    present = {s.label for s in samples if s.label is not None}
    if target_labels is not None:
        classes = tuple(target_labels)
    else:
        classes = tuple(sorted(present))
    return SampleSet(tuple(samples), classes, has_patients, thumb_data)


def check_class_sizes(sample_set: SampleSet, folds: int) -> None:
    """Refuse training when a class has fewer images (or patients) than folds need."""
    problems = []
    for cls in sample_set.classes:
        members = [s for s in sample_set.samples if s.label == cls]
        n = len({s.patient or str(s.path) for s in members}) if sample_set.has_patients else len(members)
        unit = "patients" if sample_set.has_patients else "images"
        if n == 0:
            problems.append(f"class {cls!r} has no images (remove it from target_labels)")
        elif n < folds:
            problems.append(f"class {cls!r} has {n} {unit}, fewer than the {folds} needed "
                            f"(foldNumber); add {unit}, lower foldNumber, or leave the class out "
                            "via target_labels")
    if problems:
        raise DataError(f"{sample_set.source}: " + "; ".join(problems))


def input_columns(samples: Sequence[Sample], *, labels: bool, patients: bool,
                  rows: bool = False) -> InputColumns:
    """The predictions table's input columns of ``samples``: PATH (a DICOMweb URL as written),
    the table row, label and patient (the path where none is given) where asked for, the
    source where any sample has one."""
    return InputColumns(
        paths=[layout.web_url(s.path) or str(s.path) for s in samples],
        rows=[s.row for s in samples] if rows else None,
        labels=[s.label for s in samples] if labels else None,
        patients=[s.patient or str(s.path) for s in samples] if patients else None,
        sources=[s.source or "" for s in samples] if any(s.source for s in samples) else None)
