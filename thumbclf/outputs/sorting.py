"""Copy (never move) images into <out>/sorted/<decision>/, safely and without collisions."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from thumbclf.core import layout
from thumbclf.core.errors import ImageReadError, OutputError
from thumbclf.core.files import copy_verified
from thumbclf.inputs import dicom

log = logging.getLogger(__name__)


def plan_copies(items: list[tuple[Path, str, Path | None]], root: Path, *,
                with_slides: bool = False) -> list[tuple[Path, Path]]:
    """(source, destination) of every copy: each (file, decision, thumbnail-or-None) goes to
    root/<decision>/ under a name that no other copy of this run has (case-insensitively)."""
    folders = layout.component_map(decision for _, decision, _ in items)
    taken: set[str] = set()
    jobs = []
    for src, decision, thumb in items:
        folder = root / folders[decision]
        if thumb is not None:
            jobs.append((thumb, layout.unique_file(folder, src.stem, ".png", str(src), taken)))
            if with_slides:
                jobs.append(_slide_job(src, folder, taken))
        else:
            jobs.append((src, layout.unique_file(folder, src.stem, src.suffix, str(src), taken)))
    for _, dst in jobs:
        if not layout.inside(root, dst):
            raise OutputError(f"{dst}: would land outside {root}; refused")
    return jobs


def _slide_job(src: Path, folder: Path, taken: set[str]) -> tuple[Path, Path]:
    """(slide, destination): a DICOM slide (its folder or one .dcm of it) becomes a folder."""
    dicom_folder = dicom.slide_folder(src)
    if dicom_folder is not None:
        return dicom_folder, layout.unique_file(folder, dicom_folder.name, "", str(dicom_folder),
                                                taken)
    return src, layout.unique_file(folder, src.stem, src.suffix, str(src), taken)


def copy_all(jobs: list[tuple[Path, Path]]) -> tuple[int, int]:
    """Make each copy; one left by an earlier attempt of this run (same size) is kept.

    Returns (copies made now, copies kept). Names are unique by construction, so a new copy is
    created exclusively and never replaces another file.
    """
    made = kept = 0
    for source, dst in jobs:
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
