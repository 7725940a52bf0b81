"""Whole-slide images through OpenSlide: detection, thumbnails from the best level, properties.

A slide's label and macro images are never read: they can show patient identifiers.
Thumbnails are cached as PNG files keyed by slide path, size, modification time and
thumbnail size, so later runs and every fold reuse them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from functools import lru_cache
from pathlib import Path

from PIL import Image

from thumbclf.core import layout
from thumbclf.core.errors import ImageReadError
from thumbclf.core.files import atomic_bytes
from thumbclf.core.table import SLIDE_COLUMNS
from thumbclf.inputs.images import to_rgb
from thumbclf.inputs.samples import SLIDE_SUFFIXES

log = logging.getLogger(__name__)
SINGLE_READ_PIXELS = 64_000_000  # larger levels are read and shrunk in strips


@lru_cache(maxsize=1)
def _openslide():
    try:
        import openslide
    except ImportError as exc:  # openslide-bin missing or broken
        raise ImageReadError(f"OpenSlide is not available ({exc}); "
                             "pip install openslide-python openslide-bin") from None
    return openslide


def is_slide(path: Path) -> bool:
    """True for slide formats; a .tif/.tiff only if OpenSlide recognises it as a slide."""
    suffix = path.suffix.lower()
    if suffix in SLIDE_SUFFIXES:
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
    if not path.exists():
        raise ImageReadError(f"{path}: file not found")
    if path.suffix.lower() == ".mrxs" and not path.with_suffix("").is_dir():
        raise ImageReadError(f"{path}: the MIRAX data folder {path.with_suffix('').name}/ is "
                             "missing; copy it next to the .mrxs file")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise ImageReadError(f"{path}: not a slide format OpenSlide supports") from None
    except (openslide.OpenSlideError, OSError) as exc:
        raise ImageReadError(f"{path}: cannot open the slide ({exc})") from None


def cache_key(path: Path, long_side: int) -> str:
    """Key of a slide's thumbnail: path, size, modification time and thumbnail size."""
    st = path.stat()
    text = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{long_side}|v1"
    return hashlib.sha1(text.encode()).hexdigest()


def _render(slide, long_side: int) -> Image.Image:
    w0, h0 = slide.dimensions
    scale = long_side / max(w0, h0)
    out_w, out_h = max(1, round(w0 * scale)), max(1, round(h0 * scale))
    level = slide.get_best_level_for_downsample(1 / scale) if scale < 1 else 0
    lw, lh = slide.level_dimensions[level]
    down = slide.level_downsamples[level]
    if lw * lh <= SINGLE_READ_PIXELS:
        region = slide.read_region((0, 0), level, (lw, lh))
        return _on_white(region).resize((out_w, out_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    canvas = Image.new("RGB", (out_w, out_h), (255, 255, 255))
    strip = max(1, SINGLE_READ_PIXELS // lw)
    for top in range(0, lh, strip):
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


def thumbnail(path: Path, long_side: int, *, cache_dir: Path | None = None) -> Image.Image:
    """The whole slide as an RGB image whose long side is ``long_side`` pixels."""
    cached = cache_file(path, long_side, cache_dir) if cache_dir else None
    if cached is not None and cached.is_file():
        try:
            with Image.open(cached) as img:
                return img.convert("RGB")
        except OSError:
            log.debug("unreadable cached thumbnail %s; rendering again", cached)
    slide = _open_slide(path)
    try:
        img = _render(slide, long_side)
    except Exception as exc:  # noqa: BLE001 - OpenSlide raises many kinds on broken tiles
        raise ImageReadError(f"{path}: cannot read the slide's pixels ({exc})") from None
    finally:
        slide.close()
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        layout.tag_cache_folder(cached.parent)
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)
        atomic_bytes(buf.getvalue(), cached)
    return img


def properties(path: Path) -> dict[str, object]:
    """Vendor, objective power, microns per pixel, level count and size of a slide."""
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
