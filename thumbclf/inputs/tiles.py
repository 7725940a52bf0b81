"""Thumbnails from tiled slide levels at reduced scale, in bounded time and memory.

A thumbnail never needs the full-resolution pixels of a large level. Each JPEG tile is decoded
at 1/2, 1/4 or 1/8 of its size by libjpeg-turbo's DCT scaling (simplejpeg; Pillow's ``draft``
where it has no wheel) straight into an array, reduced further by an integer box filter where
the level is still much larger than the thumbnail, and copied into a canvas of 1-2 times the
thumbnail's size; one bilinear resize finishes. So a 48,600 x 27,760 single-level slide needs a
few megabytes, not gigabytes, and its tiles are read one at a time from the file. TIFF levels
(``tiff_levels``) and DICOM frames (``dicom.py``) both come here as a :class:`TiledLevel`.
"""

from __future__ import annotations

import io
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from thumbclf.core.errors import TOO_LARGE, ImageReadError
from thumbclf.core.files import regular_file

# An Adobe APP14 segment with transform 0: the JPEG's three components are R, G, B (Aperio
# and other TIFF writers store RGB without saying so; libjpeg would take them for YCbCr).
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
DCT_SCALES = (8, 4, 2, 1)
MANY_TILES = 2_000  # a level of this many tiles (a single-level slide) is decoded in threads
CANVAS_FACTOR = 2  # the canvas keeps at least twice the thumbnail's size before the last resize
# Bounds checked before anything is allocated (issue 33): a few-kB file can claim any size.
MAX_TILES = 1_000_000  # tiles (frames) in the level read; a 200,000 px square slide has 610,000
MAX_TILE_PIXELS = 4096 * 4096  # one tile (48 MB decoded at most)
MAX_CANVAS_PIXELS = 32_000_000  # the canvas (96 MB at most; 2-16x the thumbnail in practice)
CHUNK = 256  # tiles read, decoded and placed at once (the budget is checked between chunks)
NO_PIXELS = "no pixel data stored"  # a level whose tiles are all absent or empty


class SlideTooLarge(ImageReadError):
    """A slide that would take more than the per-slide budget (time or pixels)."""

    kind = TOO_LARGE


@dataclass
class TiledLevel:
    """One level of a slide as a grid of encoded tiles."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    source: Path  # the file holding the tiles
    locate: Callable[[int, int], list[tuple[int, int]] | None]  # (offset, length) spans of the
    # encoded tile at column, row; None or [] where the tile is not stored
    codec: str = "jpeg"  # "jpeg", "jpeg2000" or "raw" (uint8 RGB, tile_h x tile_w x 3)
    tables: bytes | None = None  # TIFF JPEGTables (quantisation and Huffman tables)
    rgb: bool = False  # JPEG components are RGB (not YCbCr)
    positions: set[tuple[int, int]] | None = None  # sparse levels: the tiles stored
    source_of: Callable[[int, int], Path] | None = None  # tiles spread over several files
    photometric: str = ""  # DICOM PhotometricInterpretation (YBR_FULL_422, RGB, ...)
    fetch_row: Callable[[int], dict[int, bytes]] | None = None  # tiles not in files (DICOMweb):
    # the encoded tiles of one row, by column

    @property
    def grid(self) -> tuple[int, int]:
        return math.ceil(self.width / self.tile_w), math.ceil(self.height / self.tile_h)


@dataclass
class ReadStats:
    """What one rendering read: the level, the scale, tiles and encoded bytes, decode time."""

    level: int = 0
    dct_scale: int = 1
    box: int = 1
    tiles: int = 0
    encoded_bytes: int = 0
    decode_seconds: float = 0.0
    seconds: float = 0.0
    reader: str = "tiles"
    tiles_seconds: float = 0.0  # reading, decoding and copying the tiles
    resize_seconds: float = 0.0  # the last resize, canvas to thumbnail
    decoded_pixels: int = 0  # pixels the decoder produced (after DCT scaling), all tiles
    canvas_pixels: int = 0  # the largest picture held at once
    level_size: tuple[int, int] | None = None  # width, height of the level read
    photometric: str = ""  # DICOM only: the level's PhotometricInterpretation
    note: str = ""  # levels skipped as unreadable before the one read


def decode_threads(n_tiles: int) -> int:
    """Threads decoding one slide's tiles: 1 for ordinary levels (worker processes share the
    cores); THUMBCLF_TILE_THREADS (default 1) for levels of many tiles. On the 2 cores of the
    bench machine, 2 threads decoding 4,000 small tiles gained nothing (each call is a fraction
    of a millisecond), so they are off unless asked for."""
    try:
        most = int(os.environ.get("THUMBCLF_TILE_THREADS", "1"))
    except ValueError:
        most = 1
    return max(1, min(most, os.cpu_count() or 1)) if n_tiles >= MANY_TILES else 1


def choose_level(sizes: list[tuple[int, int]], out: tuple[int, int]) -> int:
    """The smallest level at least as large as the thumbnail (else the largest level)."""
    fits = [i for i, (w, h) in enumerate(sizes) if w >= out[0] and h >= out[1]]
    if not fits:
        return max(range(len(sizes)), key=lambda i: sizes[i][0] * sizes[i][1])
    return min(fits, key=lambda i: sizes[i][0] * sizes[i][1])


def reduction(level: TiledLevel, out: tuple[int, int]) -> tuple[int, int]:
    """(DCT scale, box factor): how much smaller than the level each tile is decoded (a scale
    that divides the tile exactly), and then reduced, before it is placed. The box is any whole
    factor: each tile is placed by its footprint on the canvas, so a tile of 250 px (no DCT
    scale divides it) still gets the full reduction and a canvas of bounded size."""
    scale = 1
    if level.codec == "jpeg":
        for s in DCT_SCALES:
            if (level.tile_w % (8 * s) == 0 and level.tile_h % (8 * s) == 0
                    and level.width // s >= out[0] and level.height // s >= out[1]):
                scale = s
                break
    box = max(1, min(level.width // (scale * CANVAS_FACTOR * out[0]),
                     level.height // (scale * CANVAS_FACTOR * out[1])))
    return scale, box


def check_bounds(level: TiledLevel, out: tuple[int, int], where: str) -> tuple[int, int]:
    """The reduction of ``level``, after checking its tile size, tile count and canvas against
    the limits: SlideTooLarge (or ImageReadError) before anything is allocated."""
    if not (0 < level.tile_w and 0 < level.tile_h and 0 < level.width and 0 < level.height):
        raise ImageReadError(f"{where}: a level of {level.width} x {level.height} pixels in "
                             f"tiles of {level.tile_w} x {level.tile_h}: not a valid slide")
    if level.tile_w * level.tile_h > MAX_TILE_PIXELS:
        raise SlideTooLarge(f"{where}: too large: tiles of {level.tile_w} x {level.tile_h} "
                            f"pixels (thumbclf reads tiles of up to {MAX_TILE_PIXELS:,} pixels)")
    cols, rows = level.grid
    if cols * rows > MAX_TILES:
        raise SlideTooLarge(f"{where}: too large: {cols * rows:,} tiles in the level read "
                            f"(at most {MAX_TILES:,}); convert it to a pyramidal slide")
    scale, box = reduction(level, out)
    step = scale * box
    canvas = max(1, level.width // step) * max(1, level.height // step)
    if canvas > MAX_CANVAS_PIXELS:
        raise SlideTooLarge(f"{where}: too large: a level of {level.width} x {level.height} "
                            f"pixels cannot be reduced to a thumbnail of {out[0]} x {out[1]} in "
                            "bounded memory; convert it to a pyramidal slide")
    return scale, box


@lru_cache(maxsize=1)
def _simplejpeg():
    try:
        import simplejpeg

        return simplejpeg
    except ImportError:  # no wheel for this platform: Pillow decodes
        return None


def complete_jpeg(data: bytes, *, tables: bytes | None, rgb: bool) -> bytes:
    """A TIFF tile's abbreviated JPEG stream made whole: the TIFF's tables spliced in, and an
    Adobe marker saying "RGB" where the components are RGB."""
    if tables and len(tables) > 4:
        return tables[:-2] + (ADOBE_RGB if rgb else b"") + data[2:]
    if rgb and b"Adobe" not in data[:512]:
        return data[:2] + ADOBE_RGB + data[2:]
    return data


def _check_tile_size(w: int, h: int) -> None:
    """ValueError for a tile whose stream claims more pixels than a tile may have."""
    if w * h > MAX_TILE_PIXELS:
        raise ValueError(f"the tile's stream claims {w} x {h} pixels")


def decode_jpeg(data: bytes, *, tables: bytes | None, rgb: bool, scale: int) -> np.ndarray:
    """One JPEG tile decoded at 1/scale by libjpeg-turbo's DCT scaling, as an RGB array.

    simplejpeg (libjpeg-turbo, where it has a wheel) decodes with no Python marker parsing:
    per 256 px tile of bench/slides.py, 0.3 ms at 1/2 and 0.2 ms at 1/8 against 0.35 ms for a
    full-size decode; Pillow's ``draft`` (the fallback) takes 0.5 ms at 1/2.
    """
    data = complete_jpeg(data, tables=tables, rgb=rgb)
    sj = _simplejpeg()
    if sj is not None:
        try:
            h, w, _, _ = sj.decode_jpeg_header(data)
            _check_tile_size(w, h)
            return sj.decode_jpeg(data, colorspace="RGB", min_width=max(1, w // scale),
                                  min_height=max(1, h // scale))
        except ValueError:  # a stream libjpeg-turbo refuses strictly: Pillow says why
            pass
    img = Image.open(io.BytesIO(data))
    _check_tile_size(*img.size)
    if scale > 1:
        w, h = img.size
        img.draft("RGB", (max(1, w // scale), max(1, h // scale)))
    img.load()
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def _decode(level: TiledLevel, data: bytes, scale: int) -> np.ndarray:
    if level.codec == "jpeg":
        arr = decode_jpeg(data, tables=level.tables, rgb=level.rgb, scale=scale)
    elif level.codec == "raw":
        arr = np.frombuffer(data, np.uint8)[: level.tile_w * level.tile_h * 3]
        arr = arr.reshape(level.tile_h, level.tile_w, 3)
    else:
        with Image.open(io.BytesIO(data)) as img:
            _check_tile_size(*img.size)  # what the stream claims, before it is decoded
            arr = np.asarray(img.convert("RGB"))
    want = (-(-level.tile_h // scale), -(-level.tile_w // scale))
    if arr.shape[:2] != want:
        arr = np.asarray(Image.fromarray(arr).resize(want[::-1], Image.Resampling.BOX))
    return arr


def shrink(canvas: np.ndarray, out: tuple[int, int]) -> Image.Image:
    """The canvas (1-2x the thumbnail: the DCT scale and box did the rest) resized to ``out``.
    Pillow's bilinear (a triangle filter widened to the factor, so antialiased) is as close to
    a full-size Lanczos reduction as bicubic here (0.83 vs 0.79 of 255 on average), in half
    the time. (torch's uint8 kernel is 2-4x faster still, but torch's thread pool hangs in the
    decode workers forked from a process that has used it.)"""
    img = Image.fromarray(canvas, "RGB")
    return img if img.size == tuple(out) else img.resize(out, Image.Resampling.BILINEAR)


def render(level: TiledLevel, out: tuple[int, int], *, deadline: float | None, where: str,
           budget_s: float, stats: ReadStats | None = None) -> Image.Image:
    """The level as an RGB image of size ``out``; SlideTooLarge once ``deadline`` passes."""
    start = time.perf_counter()
    scale, box = check_bounds(level, out, where)
    step = scale * box
    canvas = np.full((max(1, level.height // step), max(1, level.width // step), 3), 255, np.uint8)
    run = _Run(level, canvas, scale, box, where, deadline=deadline, budget_s=budget_s)
    rows = level.grid[1]
    threads = decode_threads(level.grid[0] * rows)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="tiles") if threads > 1 else None
    try:
        for ty in range(rows):
            run._check_time(ty)
            run.row(ty, pool)
    finally:
        if pool is not None:
            pool.shutdown()
        for fh in run.files.values():
            fh.close()
    if run.n == 0:  # white glass would be classified: no data is an error row (issue 33)
        raise ImageReadError(f"{where}: {NO_PIXELS}: none of the {level.grid[0] * rows:,} "
                             "tiles of the level read holds data; copy the slide again")
    t_resize = time.perf_counter()
    img = shrink(canvas, out)
    if stats is not None:
        stats.dct_scale, stats.box, stats.tiles, stats.encoded_bytes = scale, box, run.n, run.nbytes
        stats.decode_seconds, stats.decoded_pixels = run.decode_s, run.decoded
        stats.canvas_pixels = canvas.shape[0] * canvas.shape[1]
        stats.tiles_seconds = t_resize - start
        stats.resize_seconds = time.perf_counter() - t_resize
        stats.seconds = time.perf_counter() - start
    return img


@dataclass
class _Run:
    """One rendering's canvas and counts."""

    level: TiledLevel
    canvas: np.ndarray
    scale: int
    box: int
    where: str
    deadline: float | None = None
    budget_s: float = 0.0
    n: int = 0
    nbytes: int = 0
    decode_s: float = 0.0
    decoded: int = 0
    files: dict = field(default_factory=dict)

    def _file(self, path: Path):
        fh = self.files.get(path)
        if fh is None:
            try:
                regular_file(path)
                fh = self.files[path] = open(path, "rb")
            except OSError as exc:
                raise ImageReadError(f"{self.where}: cannot open {path.name} "
                                     f"({exc.strerror or exc})") from None
        return fh

    def _check_time(self, ty: int) -> None:
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise SlideTooLarge(f"{self.where}: too large: reading stopped after "
                                f"{self.budget_s:g} s, the per-slide budget ({ty} of "
                                f"{self.level.grid[1]} tile rows read); convert it to a "
                                "pyramidal slide, or raise slide_budget_s")

    def row(self, ty: int, pool=None) -> None:
        """Read one row of tiles (in order, CHUNK at a time, the budget checked between
        chunks), decode and reduce them (in ``pool``'s threads when given: the decoders release
        the GIL), copy them into the canvas."""
        level, stored = self.level, self.level.positions
        cols = level.grid[0]
        fetched = level.fetch_row(ty) if level.fetch_row is not None else None  # DICOMweb
        for first in range(0, cols, CHUNK):
            self._check_time(ty)
            jobs = []
            for tx in range(first, min(cols, first + CHUNK)):
                if fetched is not None:
                    if fetched.get(tx):
                        jobs.append((tx, ty, fetched[tx]))
                    continue
                if stored is not None and (tx, ty) not in stored:
                    continue
                spans = level.locate(tx, ty)
                if not spans:
                    continue
                fh = self._file(level.source_of(tx, ty) if level.source_of else level.source)
                data = b"".join(_read(fh, offset, length) for offset, length in spans)
                if data:
                    jobs.append((tx, ty, data))
            for (x0, y0), tile, data_len, secs in (pool.map(self._tile, jobs) if pool else
                                                   map(self._tile, jobs)):
                if tile is not None:
                    self.canvas[y0:y0 + tile.shape[0], x0:x0 + tile.shape[1]] = tile
                self.decode_s += secs
                self.n += 1
                self.nbytes += data_len

    def _footprint(self, tx: int, ty: int) -> tuple[int, int, int, int]:
        """The canvas box (x0, y0, x1, y1) of tile (tx, ty)."""
        lv, step = self.level, self.scale * self.box
        h, w = self.canvas.shape[:2]
        x0, y0 = tx * lv.tile_w // step, ty * lv.tile_h // step
        x1 = min(w, min(lv.width, (tx + 1) * lv.tile_w) // step)
        y1 = min(h, min(lv.height, (ty + 1) * lv.tile_h) // step)
        return x0, y0, x1, y1

    def _tile(self, job: tuple[int, int, bytes]):
        tx, ty, data = job
        t0 = time.perf_counter()
        try:
            tile = _decode(self.level, data, self.scale)
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageReadError(f"{self.where}: cannot decode tile ({tx}, {ty}) ({exc})"
                                 ) from None
        secs = time.perf_counter() - t0
        self.decoded += tile.shape[0] * tile.shape[1]
        x0, y0, x1, y1 = self._footprint(tx, ty)
        if x1 <= x0 or y1 <= y0:
            return (x0, y0), None, len(data), secs
        lv, s = self.level, self.scale
        inside = (-(-(min(lv.height, (ty + 1) * lv.tile_h) - ty * lv.tile_h) // s),
                  -(-(min(lv.width, (tx + 1) * lv.tile_w) - tx * lv.tile_w) // s))
        tile = tile[:inside[0], :inside[1]]  # the part of an edge tile inside the level
        want = (y1 - y0, x1 - x0)
        if tile.shape[:2] != want:
            img = Image.fromarray(np.ascontiguousarray(tile))
            if tile.shape[0] == want[0] * self.box and tile.shape[1] == want[1] * self.box:
                img = img.reduce(self.box)
            else:
                img = img.resize(want[::-1], Image.Resampling.BOX)
            tile = np.asarray(img)
        return (x0, y0), tile, len(data), secs


def _read(fh, offset: int, length: int) -> bytes:
    fh.seek(offset)
    return fh.read(length)


def _tiff_level(path: Path, page) -> TiledLevel | None:
    """A TIFF page as a TiledLevel when its tiles can be read here (8-bit RGB, JPEG or none)."""
    if not page.is_tiled or page.planarconfig != 1 or page.samplesperpixel != 3:
        return None
    if page.bitspersample != 8 or getattr(page, "imagedepth", 1) != 1:
        return None
    compression, photometric = int(page.compression), int(page.photometric)
    if compression == 7 and photometric in (2, 6):  # JPEG, RGB or YCbCr
        codec = "jpeg"
    elif compression == 1 and photometric == 2:
        codec = "raw"
    else:
        return None
    offsets, counts = page.dataoffsets, page.databytecounts
    cols = math.ceil(page.imagewidth / page.tilewidth)

    def locate(tx: int, ty: int) -> list[tuple[int, int]] | None:
        i = ty * cols + tx
        if i >= len(offsets) or not counts[i]:
            return None
        return [(int(offsets[i]), int(counts[i]))]

    return TiledLevel(page.imagewidth, page.imagelength, page.tilewidth, page.tilelength,
                      path, locate,
                      codec, page.jpegtables if codec == "jpeg" else None,
                      rgb=codec == "jpeg" and photometric == 2)


def tiff_levels(path: Path) -> list[tuple[tuple[int, int], TiledLevel | None]] | None:
    """The levels of a tiled TIFF slide (size, and a TiledLevel where readable here)."""
    regular_file(path)  # a FIFO named .svs: refused, never waited on
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            pages = [lv.keyframe for lv in series.levels]
            return [((int(p.imagewidth), int(p.imagelength)), _tiff_level(path, p)) for p in pages]
    except Exception:  # noqa: BLE001 - anything tifffile cannot parse is left to OpenSlide
        return None
