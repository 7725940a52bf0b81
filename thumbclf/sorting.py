"""Copy (never move) images into <out>/sorted/<decision>/, safely and without collisions."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from pathlib import Path

from .errors import OutputError
from .results import copy_verified

log = logging.getLogger(__name__)


def safe_name(text: str) -> str:
    """A single, harmless path component: no separators, no '..', no control characters."""
    name = re.sub(r'[\\/:*?"<>|\x00-\x1f]', "_", text).strip().strip(".")
    return name or "_"


def _target(root: Path, decision: str, src: Path, taken: set[Path], suffix: str | None = None) -> Path:
    folder = root / safe_name(decision)
    base = safe_name(src.name if suffix is None else src.stem + suffix)
    dst = folder / base
    if dst in taken:  # same file name from another folder: add a hash of the full path
        tag = hashlib.sha1(str(src).encode()).hexdigest()[:8]
        p = Path(base)
        dst = folder / f"{p.stem}__{tag}{p.suffix}"
    resolved = dst.resolve()
    if root.resolve() not in resolved.parents:
        raise OutputError(f"{src}: its sorted copy would land outside {root}; refused")
    taken.add(dst)
    return dst


def sort_copies(items: list[tuple[Path, str, Path | None]], root: Path, *,
                with_slides: bool = False) -> int:
    """Copy each (source, decision, thumbnail-or-None) into root/decision/; return copies made.

    For slides, ``thumbnail`` is the rendered PNG: it is copied, and the slide file itself (with
    a .mrxs data folder) only when ``with_slides``. Existing identical copies are kept (resume).
    """
    taken: set[Path] = set()
    made = 0
    for src, decision, thumb in items:
        if thumb is not None:
            jobs = [(thumb, _target(root, decision, src, taken, suffix=".png"))]
            if with_slides:
                jobs.append((src, _target(root, decision, src, taken)))
        else:
            jobs = [(src, _target(root, decision, src, taken))]
        for source, dst in jobs:
            if dst.is_file() and dst.stat().st_size == source.stat().st_size:
                continue
            copy_verified(source, dst)
            made += 1
            data_dir = source.with_suffix("")
            if source.suffix.lower() == ".mrxs" and data_dir.is_dir() and source == src:
                target_dir = dst.with_suffix("")
                if not target_dir.exists():
                    shutil.copytree(data_dir, target_dir)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        log.info("sorted/%s: %d files", folder.name, sum(1 for _ in folder.iterdir()))
    return made
