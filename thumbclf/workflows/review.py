"""thumbclf review: write the review page of a results folder, serve it on 127.0.0.1 (the
corrections go into an append-only journal there), and apply corrections to a deploy.

Everything is written inside the results folder, under the folder's lock; nothing is
overwritten, and each step can be run again (it finishes what is missing).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import pandas as pd
import yaml
from PIL import Image
from tqdm import tqdm

from thumbclf.core import layout, machine
from thumbclf.core import table as table_io
from thumbclf.core.decide import UNDECIDED
from thumbclf.core.errors import DataError, ImageReadError, OutputError
from thumbclf.core.files import OutputLock, atomic_bytes, atomic_csv, atomic_text
from thumbclf.inputs import slides
from thumbclf.inputs.corrections import read_corrections, resolved_key
from thumbclf.inputs.images import (DEFAULT_MAX_PIXELS, DEFAULT_SLIDE_BUDGET_S, DEFAULT_SLIDE_SIZE,
                                    open_rgb)
from thumbclf.outputs import journal
from thumbclf.outputs import review_page
from thumbclf.outputs import sorting
from thumbclf.outputs.sorting import copy_all
from thumbclf.workflows import review_server
from thumbclf.workflows.review_server import EXPORT, HOST

log = logging.getLogger(__name__)
COLUMNS = journal.COLUMNS
APPLIED = "applied.json"  # review/: the sorted copies the last --apply made
REVIEWED_CLASS, REVIEWER, REVIEWED_AT = "reviewed_class", "reviewer", "reviewed_at"


# ---------------------------------------------------------------------------- the results folder


def table_file(folder: Path) -> Path:
    """The predictions table of a deploy or training results folder."""
    for candidate in (folder / layout.PREDICTIONS, layout.fold_predictions(folder, 0)):
        if candidate.is_file():
            return candidate
    if not folder.is_dir():
        raise DataError(f"{folder}: no such results folder; give the folder a thumbclf deploy "
                        "or train run wrote")
    raise DataError(f"{folder}: no predictions.csv (nor full/val_predictions.csv); is it a "
                    "finished thumbclf deploy or training results folder?")


def settings(folder: Path) -> dict:
    """The run's settings that previews and copies need (config.yaml; defaults without it)."""
    try:
        cfg = yaml.safe_load((folder / layout.CONFIG).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    cache = cfg.get("cache_dir") or str(folder.parent / layout.CACHE_FOLDER)
    return {"slide_size": int(cfg.get("slide_thumbnail_size") or DEFAULT_SLIDE_SIZE),
            "max_pixels": int(cfg.get("max_image_pixels") or DEFAULT_MAX_PIXELS),
            "budget_s": float(cfg.get("slide_budget_s") or DEFAULT_SLIDE_BUDGET_S),
            "slide_cache": Path(cache) / layout.SLIDE_THUMBNAILS,
            "sort_slides": bool(cfg.get("sort_slides", False))}


def picture(path: Path, cfg: dict) -> Image.Image:
    """What the model saw: a slide's thumbnail (its pixel levels, never the label or macro
    image; the run's cached one where it exists, never written to the cache) or the image."""
    if slides.is_slide(path):
        cached = slides.cache_file(path, cfg["slide_size"], cfg["slide_cache"])
        if cached.is_file():
            with Image.open(cached) as img:
                return img.convert("RGB")
        return slides.thumbnail(path, cfg["slide_size"], budget_s=cfg["budget_s"])
    return open_rgb(path, target=review_page.LARGE, max_pixels=cfg["max_pixels"])


def _lock(folder: Path) -> OutputLock:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such results folder")
    return OutputLock(folder).acquire()


# ---------------------------------------------------------------------------- the page


def write_previews(folder: Path, table: pd.DataFrame, *, progress: bool = False) -> int:
    """Previews of every readable row and the Grad-CAM overlays (missing ones only); returns
    how many pictures could not be read."""
    review, cfg = folder / layout.REVIEW, settings(folder)
    ok = table[table_io.ERROR].fillna("") == "" if table_io.ERROR in table else [True] * len(table)
    todo = [p for p, good in zip(table_io.strings(table[table_io.PATH]), ok)
            if good and not all(f.is_file() for k, f in review_page.preview_files(review, p).items()
                                if k != "g")]

    def one(path: str) -> str | None:
        try:
            review_page.write_previews(picture(Path(path), cfg), review_page.preview_files(review, path))
            return None
        except (ImageReadError, OSError) as exc:
            return str(exc)

    failed = 0
    with ThreadPoolExecutor(max(1, min(8, machine.cores()))) as pool:
        for err in tqdm(pool.map(one, todo), total=len(todo), desc="previews", unit="slide",
                        disable=not progress or not todo):
            if err:
                failed += 1
                log.debug("no preview: %s", err)
    index = folder / layout.GRADCAM_INDEX
    if index.is_file():
        for path, overlay in table_io.read_csv(index).itertuples(index=False):
            source = folder / overlay
            if layout.inside(folder, source) and source.is_file():
                with Image.open(source) as img:
                    review_page.write_overlay(img, review_page.preview_files(review, path)["g"])
    return failed


def write_review(folder: Path, *, progress: bool = False) -> Path:
    """review/index.html and its previews, for the results folder ``folder``."""
    table_file(folder)  # a folder without predictions gets nothing written into it
    with _lock(folder):
        return _write_review(folder, progress=progress)


def _write_review(folder: Path, *, progress: bool) -> Path:
    source = table_file(folder)
    table, classes = table_io.read(source)
    failed = write_previews(folder, table, progress=progress)
    if failed:
        log.warning("%d slides have no preview (their files could not be read now)", failed)
    records = review_page.items(table, classes, review=folder / layout.REVIEW)
    title = f"Review: {folder.name} ({len(table)} slides)"
    page = review_page.write(folder / layout.REVIEW, records, classes, title=title,
                             page=review_page.page_id(source))
    needs = sum(1 for r in records if r["d"] == UNDECIDED or (r["l"] and r["l"] != r["d"] and not r["e"]))
    log.info("review page: %s (%d slides, %d need review)", page, len(records), needs)
    return page


# ---------------------------------------------------------------------------- the journal


journal_entries = journal.read  # the journal's entries in sequence order
write_new = review_server.write_new


def corrections_table(entries: list[dict], table: pd.DataFrame) -> pd.DataFrame:
    """The journal's last word on each slide, as corrections.csv (in the table's order)."""
    return journal.corrections(entries, table)


def serve(folder: Path, port: int = 8765, *, progress: bool = False, ready=None) -> None:
    """Write the page, then serve it on 127.0.0.1:``port`` until interrupted (Ctrl-C).
    ``ready(server)`` is called once it listens (tests stop it with server.shutdown())."""
    with _lock(folder):
        _write_review(folder, progress=progress)
        try:
            server = review_server.ReviewServer(folder, port, table_file(folder))
        except (OSError, OverflowError) as exc:  # OverflowError: a port over 65535
            why = getattr(exc, "strerror", None) or exc
            raise OutputError(f"{HOST}:{port}: cannot serve the review page ({why}); choose "
                              "another --port (1 to 65535)") from None
        log.info("review page at %s (this machine only; the address holds this run's secret "
                 "token: give it to no one; from another machine: ssh -L %d:%s:%d HOST); "
                 "corrections are saved in %s; stop with Ctrl-C", server.url,
                 server.server_address[1], HOST, server.server_address[1], server.journal)
        if ready is not None:
            ready(server)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            log.info("stopped serving; the corrections are in %s", server.journal)
        finally:
            server.server_close()


# ---------------------------------------------------------------------------- applying corrections


def reviewed_table(table: pd.DataFrame, classes: list[str], corrections) -> pd.DataFrame:
    """The predictions table plus the reviewed class (the model's decision where no correction
    says otherwise), the reviewer and when. DataError for corrections of slides not in the
    table or of classes the model does not have, naming the rows."""
    index = {resolved_key(layout.input_text(p)): i
             for i, p in enumerate(table_io.strings(table[table_io.PATH]))}
    outside = [c for c in corrections if c.key not in index]
    if outside:
        shown = ", ".join(f"{c.where} ({c.path})" for c in outside[:5])
        raise DataError(f"corrections: {len(outside)} slides are not in this results folder's "
                        f"predictions: {shown}; apply them to the run that predicted them")
    unknown = [c for c in corrections if c.label not in classes and c.label != UNDECIDED]
    if unknown:
        shown = ", ".join(f"{c.where} ({c.label!r})" for c in unknown[:5])
        raise DataError(f"corrections: classes the model does not have: {shown}; the classes "
                        f"are {', '.join(classes)} and {UNDECIDED}")
    out = table.copy()
    reviewed = table_io.strings(out[table_io.DECISION])
    who, when = [""] * len(out), [""] * len(out)
    for c in corrections:
        i = index[c.key]
        reviewed[i], who[i], when[i] = c.label, c.reviewer, c.reviewed_at
    out[REVIEWED_CLASS], out[REVIEWER], out[REVIEWED_AT] = reviewed, who, when
    return out


def reviewed_copies(folder: Path, table: pd.DataFrame, cfg: dict) -> list[tuple[Path, Path]]:
    """(source, copy) for each slide whose reviewed class differs from the model's decision:
    sorted/<reviewed class>/<name>__<hash of its path>, the same name on every run; the
    deploy's own copy path (sorting.source_jobs: a DICOM slide is its series, never its label)."""
    root = folder / layout.SORTED
    changed = table[(table[REVIEWED_CLASS] != table[table_io.DECISION])
                    & (table[table_io.ERROR].fillna("") == "" if table_io.ERROR in table else True)]
    folders = layout.component_map(table_io.strings(changed[REVIEWED_CLASS]))
    jobs = []
    for path_text, cls in zip(table_io.strings(changed[table_io.PATH]),
                              table_io.strings(changed[REVIEWED_CLASS])):
        src, tag, thumb = Path(path_text), review_page.preview_stem(path_text)[:8], None
        if slides.is_slide(src):
            thumb = folder / layout.REVIEW / "thumbnails" / f"{review_page.preview_stem(path_text)}.png"
            if not thumb.is_file():
                buf = io.BytesIO()
                picture(src, cfg).save(buf, format="PNG")
                atomic_bytes(buf.getvalue(), thumb)

        def name(stem: str, suffix: str, _source: str, target=root / folders[cls], tag=tag) -> Path:
            return target / layout.safe_file_name(f"{layout.safe_component(stem)}__{tag}", suffix)

        jobs += sorting.source_jobs(src, thumb, name, with_slides=cfg["sort_slides"])
    sorting.check_inside(root, jobs)
    return jobs


def _drop_stale(folder: Path, jobs: list[tuple[Path, Path]]) -> int:
    """Remove the copies an earlier --apply made (listed in review/applied.json) that these
    corrections no longer make, so that no slide stays in two class folders (issue 33); then
    list this apply's copies. Only files this command made are ever removed."""
    record, root = folder / layout.REVIEW / APPLIED, folder / layout.SORTED
    try:
        before = json.loads(record.read_text(encoding="utf-8", errors="surrogateescape"))
    except (OSError, ValueError):
        before = []
    now = {str(dst.relative_to(folder)) for _, dst in jobs}
    removed = 0
    for rel in before if isinstance(before, list) else []:
        old = folder / str(rel)
        if rel in now or not layout.inside(root, old) or old.is_symlink():
            continue
        if old.is_dir():
            shutil.rmtree(old)
            removed += 1
        elif old.is_file():
            old.unlink()
            removed += 1
    text = json.dumps(sorted(now), ensure_ascii=False, indent=0)
    if before != sorted(now) or not record.is_file():
        atomic_text(text, record)
    return removed


def apply(folder: Path, tables: Sequence[Path]) -> Path:
    """reviewed_predictions.csv and the reviewed copies in sorted/; running it again with the
    same corrections changes nothing, with others refuses to replace the table."""
    with _lock(folder):
        table, classes = table_io.read(table_file(folder))
        reviewed = reviewed_table(table, classes, read_corrections(tables))
        target = folder / layout.REVIEWED
        text = table_io.to_csv(reviewed)
        if target.is_file() and target.read_text(encoding="utf-8", errors="replace") != text:
            raise OutputError(f"{target}: exists from other corrections; thumbclf never "
                              "overwrites it: move it away to apply these")
        if not target.is_file():
            atomic_csv(reviewed, target)
        jobs = reviewed_copies(folder, reviewed, settings(folder))
        stale = _drop_stale(folder, jobs)
        made, kept = copy_all(jobs)
        n = int((reviewed[REVIEWED_CLASS] != reviewed[table_io.DECISION]).sum())
        log.info("reviewed: %d of %d slides have a class other than the model's; %s; sorted "
                 "copies: %d made, %d there already, %d of earlier corrections removed", n,
                 len(reviewed), target, made, kept, stale)
        return target
