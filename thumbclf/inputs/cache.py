"""Decode once: every image of a run preprocessed once into a uint8 array shared by all folds.

The array lives in memory or, for data sets that don't fit (or when asked), in a
memory-mapped file under ``cache_dir`` that later runs reuse for every image whose path,
size, modification time and preprocessing are unchanged. Decoding runs in parallel worker
processes; a file that cannot be read is recorded with the reason, never fatal here.
No torch import: workers stay light.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from thumbclf.core import layout, machine
from thumbclf.core.errors import ImageReadError, OutputError, ReadFailure
from thumbclf.core.files import OutputLock, atomic_text
from thumbclf.inputs import dicom, dicomweb, slides
from thumbclf.inputs.samples import SLIDE_SUFFIXES
from thumbclf.inputs.decode import load_array
from thumbclf.inputs.images import Preprocessing

log = logging.getLogger(__name__)
MEMORY_SHARE = 0.3  # 'auto' keeps the cache in memory when it needs less than this share of RAM


@dataclass
class DecodedImages:
    """Preprocessed images by sample position; ``errors`` maps position -> reason."""

    array: np.ndarray
    rows: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0

    def get(self, positions: np.ndarray) -> np.ndarray:
        """uint8 images (n, S, S, 3) for the given sample positions (white where unreadable)."""
        rows = self.rows[np.asarray(positions)]
        out = np.full((len(rows),) + self.array.shape[1:], 255, dtype=np.uint8)
        valid = np.flatnonzero(rows >= 0)
        order = valid[np.argsort(rows[valid], kind="stable")]  # sequential reads from a memory map
        out[order] = self.array[rows[order]]
        return out

    @property
    def ok(self) -> np.ndarray:
        """Boolean mask of the positions that decoded."""
        mask = np.ones(len(self.rows), dtype=bool)
        mask[list(self.errors)] = False
        return mask


def file_key(path: Path) -> str | None:
    """Path, size and modification time of a file, or None when it is missing; a DICOMweb
    series: its UID and its instances' metadata, or None when the server does not answer."""
    if dicomweb.is_url(path):
        try:
            return f"dicomweb|{dicomweb.fingerprint(path)}|slides-v{slides.RENDER_VERSION}"
        except ImageReadError:
            return None
    try:
        st = path.stat()
        if path.is_dir():  # a DICOM slide: the names, sizes and times of its instances
            return f"{path.resolve()}|{dicom.fingerprint(path)}|slides-v{slides.RENDER_VERSION}"
    except OSError:
        return None
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if path.suffix.lower() in SLIDE_SUFFIXES + (".tif", ".tiff"):  # rendered: its version too
        key += f"|slides-v{slides.RENDER_VERSION}"
    return key


def _decode(job: tuple[int, str, Preprocessing, str | None]) -> tuple[int, np.ndarray | None, str | None]:
    i, path, prep, slide_cache = job
    try:
        arr = load_array(Path(path), prep, slide_cache=Path(slide_cache) if slide_cache else None)
        return i, arr, None
    except ImageReadError as exc:
        return i, None, ReadFailure.of(exc)
    except Exception as exc:  # noqa: BLE001 - one bad file must not end a run
        return i, None, f"{path}: unexpected error while reading ({type(exc).__name__}: {exc})"


def _run_jobs(jobs, workers: int, progress: bool, desc: str):
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        if workers <= 1 or len(jobs) < 4:
            for job in jobs:
                yield _decode(job)
                bar.update()
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(_decode, jobs, chunksize=4):
                yield result
                bar.update()
    finally:
        bar.close()


class _DiskStore:
    """A growing memory-mapped uint8 file plus an index of file keys -> rows."""

    def __init__(self, folder: Path, prep: Preprocessing):
        tag = hashlib.sha1(prep.key.encode()).hexdigest()[:12]
        self.folder = folder / f"decoded-{prep.size}px-{tag}"
        self.data = self.folder / "images.u8"
        self.index_file = self.folder / "index.json"
        self.shape = (prep.size, prep.size, 3)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.folder}: cannot create the image cache ({exc}); set "
                              "cache_dir to a writable folder") from None
        self.index: dict[str, int] = {}
        if self.index_file.is_file():
            try:
                self.index = json.loads(self.index_file.read_text())
            except (OSError, ValueError):
                log.warning("%s is unreadable; rebuilding the image cache", self.index_file)
        self.rows_on_disk = self.data.stat().st_size // int(np.prod(self.shape)) if self.data.exists() else 0
        self.index = {k: r for k, r in self.index.items() if r < self.rows_on_disk}

    def open(self, extra_rows: int) -> np.ndarray:
        total = self.rows_on_disk + extra_rows
        with open(self.data, "ab") as f:
            f.truncate(total * int(np.prod(self.shape)))
        if total == 0:
            return np.zeros((0,) + self.shape, dtype=np.uint8)
        return np.memmap(self.data, dtype=np.uint8, mode="r+", shape=(total,) + self.shape)

    def shrink(self, rows: int) -> np.ndarray:
        """Cut the file to ``rows`` rows and map it again."""
        with open(self.data, "r+b") as f:
            f.truncate(rows * int(np.prod(self.shape)))
        self.rows_on_disk = rows
        if rows == 0:
            return np.zeros((0,) + self.shape, dtype=np.uint8)
        return np.memmap(self.data, dtype=np.uint8, mode="r+", shape=(rows,) + self.shape)

    def save_index(self) -> None:
        atomic_text(json.dumps(self.index), self.index_file)


def build(paths: list[Path], prep: Preprocessing, *, mode: str = "auto",
          cache_dir: Path | None = None, slide_cache: Path | None = None, workers: int = -1,
          progress: bool = True) -> DecodedImages:
    """Decode and preprocess every path once; return the images by position."""
    start = time.perf_counter()
    n = len(paths)
    per_image = prep.size * prep.size * 3
    if mode == "auto":
        mode = "memory" if n * per_image < MEMORY_SHARE * machine.available_memory() or cache_dir is None else "disk"
    workers = machine.workers(workers)
    slide_dir = str(slide_cache) if slide_cache else None
    errors: dict[int, str] = {}
    if mode == "memory" or cache_dir is None:
        array = np.empty((n,) + (prep.size, prep.size, 3), dtype=np.uint8)
        rows = np.arange(n)
        jobs = [(i, str(p), prep, slide_dir) for i, p in enumerate(paths)]
        for i, arr, err in _run_jobs(jobs, workers, progress, "decoding images"):
            if err is None:
                array[i] = arr
            else:
                array[i] = 255
                errors[i] = err
        log.info("decoded %d images into memory (%.0f MB)", n, array.nbytes / 1e6)
        return DecodedImages(array, rows, errors, time.perf_counter() - start)

    with _locked(cache_dir):  # two runs sharing a cache folder take turns
        return _build_on_disk(paths, prep, cache_dir, slide_dir, workers, progress, start)


def _locked(folder: Path) -> OutputLock:
    """The image cache's folder, locked: two runs sharing a cache folder take turns."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        layout.tag_cache_folder(folder)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write the image cache ({exc.strerror or exc}); set "
                          "cache_dir to a writable folder") from None
    return OutputLock(folder, name=".lock", wait=True, what="image cache",
                      fix="set cache_dir to a writable folder").acquire()


def _build_on_disk(paths, prep, cache_dir, slide_dir, workers, progress, start) -> DecodedImages:
    n = len(paths)
    errors: dict[int, str] = {}
    store = _DiskStore(cache_dir, prep)
    keys = [file_key(p) for p in paths]
    rows = np.full(n, -1, dtype=np.int64)
    todo: list[int] = []
    first_of_key: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k is not None and k in store.index:
            rows[i] = store.index[k]
        elif k is not None and k in first_of_key:
            continue  # same file twice: filled in below
        else:
            todo.append(i)
            if k is not None:
                first_of_key[k] = i
    array = store.open(len(todo))
    jobs = [(i, str(paths[i]), prep, slide_dir) for i in todo]
    next_row = store.rows_on_disk
    for i, arr, err in _run_jobs(jobs, workers, progress, "decoding images"):
        if err is None:  # only readable images take a row: failures are tried again next run
            rows[i] = next_row
            array[next_row] = arr
            next_row += 1
            if keys[i] is not None:
                store.index[keys[i]] = int(rows[i])
        else:
            errors[i] = err
    for i, k in enumerate(keys):
        if rows[i] < 0 and i not in errors and k in first_of_key:
            first = first_of_key[k]
            rows[i] = rows[first]
            if first in errors:
                errors[i] = errors[first]
    if isinstance(array, np.memmap):
        array.flush()
    array = store.shrink(next_row)  # give back the rows reserved for unreadable images
    store.save_index()
    log.info("image cache %s: %d reused, %d decoded", store.folder, n - len(todo), len(todo))
    return DecodedImages(array, rows, errors, time.perf_counter() - start)
