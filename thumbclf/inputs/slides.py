"""Whole-slide images: detection, thumbnails from the best level, properties.

A slide is a file OpenSlide reads, a MIRAX .mrxs with its data folder, or a folder holding one
DICOM WSI series (``dicom.py``). JPEG-tiled levels (TIFF, SVS, DICOM) are read tile by tile at
reduced scale (``tiles.py``); other levels through OpenSlide in strips. A slide's label and
macro (overview) images are never read: they can show patient identifiers. A slide that would
take more than the per-slide budget (seconds: slide_budget_s; pixels: max_image_pixels) fails
with a reason instead of running for hours. Thumbnails are cached as PNG files keyed by slide
path, size, modification time and thumbnail size, so later runs, every fold and every later
step (prediction, sorting, Grad-CAM, report) reuse them; each has a .json beside it saying how
it was read and how long it took.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from functools import lru_cache
from pathlib import Path

from PIL import Image

from thumbclf.core import layout
from thumbclf.core.errors import INCOMPLETE, NOT_FOUND, UNREADABLE, ImageReadError
from thumbclf.core.files import atomic_bytes, regular_file
from thumbclf.core.table import SLIDE_COLUMNS
from thumbclf.inputs import dicom, dicomweb, tiles
from thumbclf.inputs.images import DEFAULT_SLIDE_BUDGET_S, to_rgb
from thumbclf.inputs.samples import SLIDE_SUFFIXES
from thumbclf.inputs.truncation import truncation

log = logging.getLogger(__name__)
SINGLE_READ_PIXELS = 64_000_000  # larger levels are read and shrunk in strips
RENDER_VERSION = 2  # 2: JPEG tiles at reduced scale; changes every cached slide thumbnail
FAST_SUFFIXES = (".svs", ".tif", ".tiff")  # TIFF containers whose JPEG tiles are read here


@lru_cache(maxsize=1)
def _openslide():
    try:
        import openslide
    except ImportError as exc:  # openslide-bin missing or broken
        raise ImageReadError(f"OpenSlide is not available ({exc}); "
                             "pip install openslide-python openslide-bin") from None
    return openslide


def is_slide(path: Path) -> bool:
    """True for slide formats and DICOMweb series; a .tif/.tiff only if OpenSlide recognises
    it as a slide."""
    if dicomweb.is_url(path):
        return True
    suffix = path.suffix.lower()
    if suffix in SLIDE_SUFFIXES:
        return True
    if dicom.is_dicom_folder(path):
        return True
    if suffix in (".tif", ".tiff") and path.is_file():
        try:
            vendor = _openslide().OpenSlide.detect_format(str(path))
        except Exception:  # noqa: BLE001 - an unreadable TIFF is left to Pillow to report
            return False
        return vendor is not None
    return False


def _open_slide(path: Path):
    openslide = _openslide()
    regular_file(path)
    if path.suffix.lower() == ".mrxs":
        check_mirax(path)
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError) as exc:
        truncated = truncation(path)
        if truncated:
            raise ImageReadError(f"{path}: {truncated}") from None
        if isinstance(exc, openslide.OpenSlideUnsupportedFormatError):
            raise ImageReadError(f"{path}: not a slide format OpenSlide supports") from None
        raise ImageReadError(f"{path}: cannot open the slide ({exc})") from None


def check_mirax(path: Path) -> None:
    """ImageReadError naming what a MIRAX slide lacks: its data folder, Slidedat.ini or a .dat."""
    data = path.with_suffix("")
    if not data.is_dir():
        raise ImageReadError(f"{path}: the MIRAX data folder {data.name}/ is missing; copy it "
                             "next to the .mrxs file", kind=INCOMPLETE)
    index = data / "Slidedat.ini"
    try:
        regular_file(index)
        text = index.read_bytes().decode("utf-8-sig", errors="replace")
    except (OSError, ImageReadError):
        raise ImageReadError(f"{path}: the MIRAX index {data.name}/Slidedat.ini is missing or "
                             "unreadable (or not a regular file); copy the whole data folder",
                             kind=INCOMPLETE) from None
    section, names = "", []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]").strip().upper()
        elif section == "DATAFILE" and "=" in line:
            key, value = (t.strip() for t in line.split("=", 1))
            if key.upper().startswith("FILE_") and key[5:].isdigit():
                names.append(value)
    for name in names:
        dat = data / name
        try:
            regular_file(dat)  # a FIFO would block here
            with open(dat, "rb") as fh:
                fh.read(1)
        except (OSError, ImageReadError) as exc:
            missing = isinstance(exc, FileNotFoundError) or getattr(exc, "kind", "") == NOT_FOUND
            why = ("missing" if missing
                   else "not a regular file" if "regular file" in str(exc) else "unreadable")
            raise ImageReadError(f"{path}: the MIRAX data file {data.name}/{name} is {why}; "
                                 "copy the whole data folder",
                                 kind=INCOMPLETE if missing else UNREADABLE) from None


def cache_key(path: Path, long_side: int) -> str:
    """Key of a slide's thumbnail: path, size, modification time and thumbnail size.

    A DICOM slide is keyed by its folder and the names, sizes and times of its instances; a
    DICOMweb series by its UID and its instances' metadata (``dicomweb.fingerprint``).
    """
    if dicomweb.is_url(path):
        text = f"dicomweb|{dicomweb.fingerprint(path)}|{long_side}|v{RENDER_VERSION}"
    elif (folder := dicom.slide_folder(path)) is not None:
        text = f"{folder.resolve()}|{dicom.fingerprint(folder)}|{long_side}|v{RENDER_VERSION}"
    else:
        st = path.stat()
        text = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{long_side}|v{RENDER_VERSION}"
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()


def _out_size(w0: int, h0: int, long_side: int) -> tuple[int, int]:
    scale = long_side / max(w0, h0)
    return max(1, round(w0 * scale)), max(1, round(h0 * scale))


def _deadline(budget: float) -> float:
    return time.perf_counter() + budget


def _tiled_pyramid(path: Path, long_side: int):
    """(level sizes, the level at an index, reader, thumbnail size) of a DICOM or JPEG-tiled
    TIFF slide; None where its tiles are not read here."""
    if dicom.slide_folder(path) is not None:
        levels = dicom.open_series(path).levels
        sizes = [(lv.width, lv.height) for lv in levels]
        level_at, reader = (lambda i: dicom.tiled_level(levels[i])), "dicom frames"
    elif path.suffix.lower() in FAST_SUFFIXES and (found := tiles.tiff_levels(path)):
        sizes = [size for size, _ in found]
        level_at, reader = (lambda i: found[i][1]), "tiff tiles"
    else:
        return None
    return sizes, level_at, reader, _out_size(*sizes[0], long_side)


def tiled_level(path: Path, long_side: int) -> tuple[int, tiles.TiledLevel, tuple[int, int],
                                                   str] | None:
    """(level index, the level, thumbnail size, reader) of a DICOM or JPEG-tiled TIFF slide,
    the level the thumbnail is read from; None where its tiles are not read here."""
    found = _tiled_pyramid(path, long_side)
    if found is None:
        return None
    sizes, level_at, reader, out = found
    i = tiles.choose_level(sizes, out)
    level = level_at(i)
    return None if level is None else (i, level, out, reader)


def fallback_levels(chosen: int, count: int) -> list[int]:
    """The levels tried in turn when a level is unreadable: the chosen one, the next larger
    (a sharper thumbnail, more to read), the next smaller."""
    return [i for i in (chosen, chosen - 1, chosen + 1) if 0 <= i < count]


def _with_fallback(attempt, chosen: int, count: int, stats: tiles.ReadStats, where: str):
    """``attempt(level)`` on the chosen level, then on its neighbours while a level is
    unreadable (a corrupt tile or strip); the row's note says which level was skipped. The
    first error is raised when no level can be read."""
    first: BaseException | None = None
    for i in fallback_levels(chosen, count):
        try:
            img = attempt(i)
        except tiles.SlideTooLarge:
            if i == chosen:
                raise
            continue  # the larger neighbour is over the budget: try the smaller one
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - one corrupt level must not lose the slide
            first = first or exc
            log.warning("%s: level %d is unreadable (%s); trying another level", where, i, exc)
            continue
        if first is not None:
            stats.note = f"level {chosen} unreadable ({_reason(first)}); read level {i} instead"
        return img
    raise first


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text.split(": ", 1)[1] if text.startswith("/") and ": " in text else text


def render_fast(path: Path, long_side: int, stats: tiles.ReadStats,
                budget: float = DEFAULT_SLIDE_BUDGET_S) -> Image.Image | None:
    """A DICOM or JPEG-tiled TIFF slide read tile by tile at reduced scale; None: not one."""
    found = _tiled_pyramid(path, long_side)
    if found is None:
        return None
    sizes, level_at, reader, out = found
    chosen = tiles.choose_level(sizes, out)
    first = level_at(chosen)
    if first is None:
        return None
    deadline = _deadline(budget)

    def attempt(i: int) -> Image.Image:
        level = first if i == chosen else level_at(i)
        if level is None:
            raise ImageReadError(f"{path}: level {i} is not tiled in a way read here")
        stats.level, stats.reader, stats.level_size = i, reader, (level.width, level.height)
        stats.photometric = level.photometric
        return tiles.render(level, out, deadline=deadline, where=str(path), budget_s=budget,
                            stats=stats)

    return _with_fallback(attempt, chosen, len(sizes), stats, str(path))


def best_level(slide, long_side: int) -> int:
    """The OpenSlide level a thumbnail of ``long_side`` pixels is read from."""
    w0, h0 = slide.dimensions
    scale = long_side / max(w0, h0)
    return slide.get_best_level_for_downsample(1 / scale) if scale < 1 else 0


def _render(slide, long_side: int, *, level: int | None = None, where: str = "",
            max_pixels: int | None = None, stats: tiles.ReadStats | None = None,
            budget: float = DEFAULT_SLIDE_BUDGET_S, deadline: float | None = None
            ) -> Image.Image:
    w0, h0 = slide.dimensions
    out_w, out_h = _out_size(w0, h0, long_side)
    level = best_level(slide, long_side) if level is None else level
    lw, lh = slide.level_dimensions[level]
    down = slide.level_downsamples[level]
    if stats is not None:
        stats.level, stats.reader, stats.level_size = level, "openslide", (lw, lh)
    if max_pixels is not None and lw * lh > max_pixels:
        raise tiles.SlideTooLarge(
            f"{where}: too large: its smallest usable level has {lw} x {lh} pixels, more than "
            f"max_image_pixels ({max_pixels:,}), and is not JPEG-tiled; convert it to a "
            "pyramidal slide, or raise max_image_pixels")
    deadline = _deadline(budget) if deadline is None else deadline
    if lw * lh <= SINGLE_READ_PIXELS:
        region = slide.read_region((0, 0), level, (lw, lh))
        return _on_white(region).resize((out_w, out_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    canvas = Image.new("RGB", (out_w, out_h), (255, 255, 255))
    strip = max(1, SINGLE_READ_PIXELS // lw)
    for top in range(0, lh, strip):
        if time.perf_counter() > deadline:
            raise tiles.SlideTooLarge(f"{where}: too large: reading stopped after {budget:g} s, "
                                      f"the per-slide budget ({top} of {lh} rows read); convert "
                                      "it to a pyramidal slide, or raise slide_budget_s")
        rows = min(strip, lh - top)
        y0, y1 = math.floor(top * out_h / lh), math.ceil((top + rows) * out_h / lh)
        region = slide.read_region((0, round(top * down)), level, (lw, rows))
        piece = _on_white(region).resize((out_w, max(1, y1 - y0)), Image.Resampling.BICUBIC,
                                         reducing_gap=3.0)
        canvas.paste(piece, (0, y0))
    return canvas


def _on_white(region: Image.Image) -> Image.Image:
    return to_rgb(region)  # RGBA: transparent (no tissue scanned) becomes white


def cache_file(path: Path, long_side: int, cache_dir: Path) -> Path:
    """Where the thumbnail of a slide at this size is cached."""
    return cache_dir / f"{cache_key(path, long_side)}.png"


def cached_thumbnail(path: Path, long_side: int, cache_dir: Path) -> Path:
    """The cached PNG thumbnail of a slide, rendered now if it is missing."""
    target = cache_file(path, long_side, cache_dir)
    if not target.is_file():
        thumbnail(path, long_side, cache_dir=cache_dir)
    return target


def thumbnail(path: Path, long_side: int, *, cache_dir: Path | None = None,
              max_pixels: int | None = None, stats: tiles.ReadStats | None = None,
              budget_s: float = DEFAULT_SLIDE_BUDGET_S) -> Image.Image:
    """The whole slide as an RGB image whose long side is ``long_side`` pixels; SlideTooLarge
    once reading takes more than ``budget_s`` seconds."""
    try:
        there = dicomweb.is_url(path) or path.exists()
    except OSError as exc:  # a name too long
        raise ImageReadError(f"{path}: {exc.strerror or exc}") from None
    if not there:  # before the cache key reads its size (issue 33: tallied "unreadable")
        raise ImageReadError(f"{path}: file not found", kind=NOT_FOUND)
    cached = cache_file(path, long_side, cache_dir) if cache_dir else None
    if cached is not None and cached.is_file():
        try:
            with Image.open(cached) as img:
                return img.convert("RGB")
        except OSError:
            log.debug("unreadable cached thumbnail %s; rendering again", cached)
    stats = stats if stats is not None else tiles.ReadStats()
    start = time.perf_counter()
    img = _read_pixels(path, long_side, max_pixels, stats, budget_s)
    stats.seconds = time.perf_counter() - start
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        layout.tag_cache_folder(cached.parent)
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)
        atomic_bytes(buf.getvalue(), cached)
        atomic_bytes(json.dumps(stats_record(path, stats), ensure_ascii=True).encode(),
                     cached.with_suffix(".json"))
    return img


def stats_record(path: Path, stats: tiles.ReadStats) -> dict:
    """How a thumbnail was read, as stored beside the cached thumbnail (the read record)."""
    size = stats.level_size or (None, None)
    return {"path": layout.web_url(path) or str(path), "seconds": round(stats.seconds, 4),
            "reader": stats.reader,
            "level": stats.level, "level_width": size[0], "level_height": size[1],
            "photometric": stats.photometric, "note": stats.note,
            "dct_scale": stats.dct_scale, "tiles": stats.tiles,
            "encoded_bytes": stats.encoded_bytes, "decode_seconds": round(stats.decode_seconds, 4)}


def _read_pixels(path: Path, long_side: int, max_pixels: int | None,
                 stats: tiles.ReadStats, budget: float) -> Image.Image:
    if dicomweb.is_url(path):
        return dicomweb.thumbnail(path, long_side, stats=stats, budget_s=budget)
    if not path.exists():
        raise ImageReadError(f"{path}: file not found", kind=NOT_FOUND)
    if dicom.slide_folder(path) is None:
        regular_file(path)
    try:
        img = render_fast(path, long_side, stats, budget)
    except ImageReadError:
        raise
    except MemoryError:
        raise tiles.SlideTooLarge(f"{path}: too large to read in memory") from None
    except Exception as exc:  # noqa: BLE001 - a broken file must not end the run
        raise ImageReadError(f"{path}: cannot read the slide's pixels ({exc})") from None
    if img is not None:
        return img
    before = io_read_bytes()
    try:
        img = _read_openslide(path, long_side, max_pixels, stats, budget)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - OpenSlide raises many kinds on broken tiles
        raise ImageReadError(f"{path}: cannot read the slide's pixels ({exc})") from None
    after = io_read_bytes()
    stats.encoded_bytes = after - before if before is not None and after is not None else 0
    return img


def _read_openslide(path: Path, long_side: int, max_pixels: int | None,
                    stats: tiles.ReadStats, budget: float) -> Image.Image:
    """The thumbnail through OpenSlide. After an error the slide is opened again for the next
    level: an OpenSlide handle that has met an error stays in error, so it is never reused."""
    slide = _open_slide(path)
    try:
        chosen, count = best_level(slide, long_side), slide.level_count
    except Exception:
        slide.close()
        raise
    handles = [slide]
    deadline = _deadline(budget)

    def attempt(i: int) -> Image.Image:
        handle = handles.pop() if handles else _open_slide(path)
        try:
            return _render(handle, long_side, level=i, where=str(path), max_pixels=max_pixels,
                           stats=stats, budget=budget, deadline=deadline)
        finally:
            handle.close()

    return _with_fallback(attempt, chosen, count, stats, str(path))


def io_read_bytes() -> int | None:
    """Bytes this process has read so far (Linux: rchar of /proc/self/io), else None."""
    try:
        with open("/proc/self/io", "rb") as fh:
            for line in fh:
                if line.startswith(b"rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def read_record(path: Path, long_side: int, cache_dir: Path) -> dict | None:
    """How the cached thumbnail of a slide was read (seconds, reader, level), if recorded."""
    try:
        return json.loads(cache_file(path, long_side, cache_dir).with_suffix(".json").read_text())
    except (OSError, ValueError, ImageReadError):  # ImageReadError: a DICOMweb server down
        return None


def properties(path: Path) -> dict[str, object]:
    """Vendor, objective power, microns per pixel, level count and size of a slide."""
    if dicomweb.is_url(path):
        return dict(zip(SLIDE_COLUMNS, dicomweb.properties(path)))
    if dicom.slide_folder(path) is not None:
        return dict(zip(SLIDE_COLUMNS, dicom.properties(dicom.open_series(path))))
    slide = _open_slide(path)
    try:
        p = slide.properties
        openslide = _openslide()

        def num(key):
            try:
                return float(p[key])
            except (KeyError, ValueError):
                return None

        return dict(zip(SLIDE_COLUMNS, (
            p.get(openslide.PROPERTY_NAME_VENDOR), num(openslide.PROPERTY_NAME_OBJECTIVE_POWER),
            num(openslide.PROPERTY_NAME_MPP_X), num(openslide.PROPERTY_NAME_MPP_Y),
            slide.level_count, slide.dimensions[0], slide.dimensions[1])))
    finally:
        slide.close()
