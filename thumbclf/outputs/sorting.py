"""Copy (never move) images into <out>/sorted/<decision>/, safely and without collisions."""

from __future__ import annotations

import glob
import logging
import shutil
from pathlib import Path
from typing import Callable

from thumbclf.core import layout
from thumbclf.core.errors import ImageReadError, OutputError
from thumbclf.core.files import copy_verified
from thumbclf.inputs import dicom

log = logging.getLogger(__name__)


Namer = Callable[[str, str, str], Path]  # (stem, suffix, source) -> destination


def source_jobs(src: Path, thumb: Path | None, name: Namer, *,
                with_slides: bool) -> list[tuple[Path, Path]]:
    """(source, destination) of the copies of one input: the file itself; for a slide, its
    rendered thumbnail, and the slide only ``with_slides`` (a DICOM slide, named by its folder
    or by any .dcm of it, the label included, is its series folder: copy_all copies its own
    instances, never the label or overview). The one copy path of the deploy's sorting and of
    review --apply (issue 33)."""
    if thumb is None:
        return [(src, name(src.stem, src.suffix, str(src)))]
    jobs = [(thumb, name(layout.input_stem(src), ".png", str(src)))]
    if with_slides and layout.web_url(src) is None:  # a DICOMweb slide stays on its server
        series = dicom.slide_folder(src)
        if series is not None:
            jobs.append((series, name(series.name, "", str(series))))
        else:
            jobs.append((src, name(src.stem, src.suffix, str(src))))
    return jobs


def check_inside(root: Path, jobs: list[tuple[Path, Path]]) -> None:
    """OutputError where a destination would land outside ``root``."""
    for _, dst in jobs:
        if not layout.inside(root, dst):
            raise OutputError(f"{dst}: would land outside {root}; refused")


def plan_copies(items: list[tuple[Path, str, Path | None]], root: Path, *,
                with_slides: bool = False) -> list[tuple[Path, Path]]:
    """(source, destination) of every copy: each (file, decision, thumbnail-or-None) goes to
    root/<decision>/ under a name that no other copy of this run has (case-insensitively)."""
    folders = layout.component_map(decision for _, decision, _ in items)
    taken: set[str] = set()
    jobs = []
    for src, decision, thumb in items:
        folder = root / folders[decision]
        jobs += source_jobs(src, thumb, lambda stem, suffix, source, folder=folder:
                            layout.unique_file(folder, stem, suffix, source, taken),
                            with_slides=with_slides)
    check_inside(root, jobs)
    return jobs


def copy_all(jobs: list[tuple[Path, Path]]) -> tuple[int, int]:
    """Make each copy; one left by an earlier attempt of this run (same size) is kept.

    Returns (copies made now, copies kept). Names are unique by construction, so a new copy is
    created exclusively and never replaces another file.
    """
    made = kept = 0
    for source, dst in jobs:
        for left in dst.parent.glob(f".{glob.escape(dst.name)}.*.tmp"):
            left.unlink(missing_ok=True)  # an interrupted (killed) copy's hidden temporary file
        if source.is_dir():
            now = _copy_dicom(source, dst)
            made, kept = made + now, kept + 1 - now
            continue
        if dst.is_file() and dst.stat().st_size == source.stat().st_size:
            kept += 1
        else:
            if dst.is_file():
                dst.unlink()  # this run's own copy, from an attempt before the source changed
            copy_verified(source, dst)
            made += 1
        data_dir = source.with_suffix("")
        if source.suffix.lower() == ".mrxs" and data_dir.is_dir():
            _copy_folder(data_dir, dst.with_suffix(""))
    return made, kept


def _copy_dicom(src: Path, dst: Path) -> int:
    """A DICOM slide's own instances (never its label or overview), whole or not at all;
    1 when copied now, 0 when an earlier attempt's copy is there."""
    if dst.is_dir():
        return 0
    try:
        files = dicom.open_series(src).files
    except ImageReadError as exc:
        raise OutputError(f"{dst}: cannot copy the DICOM slide {src} ({exc})") from None
    tmp = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted attempt
    try:
        tmp.mkdir(parents=True)
        for f in files:
            copy_verified(f, tmp / f.name)
        tmp.rename(dst)
    except (OSError, OutputError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{dst}: cannot copy the DICOM slide {src} ({exc})") from None
    return 1


def _copy_folder(src: Path, dst: Path) -> None:
    """A MIRAX data folder, whole or not at all (copied beside, then renamed)."""
    if dst.is_dir():
        return
    tmp = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted attempt
    try:
        shutil.copytree(src, tmp)
        tmp.rename(dst)
    except (OSError, shutil.Error) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{dst}: cannot copy the slide's data folder {src} ({exc})") from None


def sort_copies(items: list[tuple[Path, str, Path | None]], root: Path, *,
                with_slides: bool = False) -> int:
    """Copy each (source, decision, thumbnail-or-None) into root/decision/; return the number
    of copies now on disk (made now or kept from an interrupted attempt).

    For slides, ``thumbnail`` is the rendered PNG: it is copied, and the slide file itself (with
    a .mrxs data folder) only when ``with_slides``.
    """
    jobs = plan_copies(items, root, with_slides=with_slides)
    made, kept = copy_all(jobs)
    on_disk = sum(1 for _, dst in jobs if dst.is_file() or dst.is_dir())  # DICOM: a folder
    if on_disk != len(jobs):
        raise OutputError(f"{root}: {len(jobs) - on_disk} sorted copies are missing after copying; "
                          "is another program deleting files there?")
    if kept:
        log.info("sorted copies: %d made now, %d kept from the interrupted attempt", made, kept)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        log.info("sorted/%s: %d files", folder.name,
                 sum(1 for p in folder.iterdir() if not p.name.startswith(".")))
    return on_disk
