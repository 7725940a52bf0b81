"""Open one image (or slide), normalise it to RGB on white, pad to a square and resize.

The same deterministic function serves training and deployment. Two recipes exist:
``thumbclf`` (aspect-preserving resize, then centre on a white square; JPEGs are decoded at
the smallest reduced size (1/2, 1/4, 1/8) not below the target, which is much faster) and
``legacy`` (the prototype's: pad with black to a
square, then Pillow's bicubic resize; no normalisation), used for its released models.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from thumbclf.core.errors import NOT_FOUND, TOO_LARGE, ImageReadError
from thumbclf.core.files import regular_file

log = logging.getLogger(__name__)

try:  # libspng: about three times Pillow's PNG decoding speed (a dependency where it has wheels)
    import pyspng
except ImportError:  # Pillow decodes them
    pyspng = None

Image.MAX_IMAGE_PIXELS = None  # we apply our own, clearer limit (max_pixels)
EXIF_ORIENTATION = 0x0112
DEFAULT_MAX_PIXELS = 400_000_000  # refuse (non-JPEG) images with more pixels (max_image_pixels)
DEFAULT_SLIDE_SIZE = 1024  # long side of thumbnails rendered from slides (slide_thumbnail_size)
DEFAULT_SLIDE_BUDGET_S = 120.0  # seconds one slide may take to read (slide_budget_s)


@dataclass(frozen=True)
class Preprocessing:
    """How a file becomes a ``size`` x ``size`` x 3 uint8 array."""

    size: int = 224
    recipe: str = "thumbclf"  # or "legacy"
    max_pixels: int = DEFAULT_MAX_PIXELS
    slide_size: int = DEFAULT_SLIDE_SIZE
    slide_budget_s: float = DEFAULT_SLIDE_BUDGET_S

    @property
    def key(self) -> str:
        """A string that changes whenever the pixels produced could change."""
        d = asdict(self)
        d.pop("max_pixels"), d.pop("slide_budget_s")  # limits, not pixels
        return "-".join(f"{k}={v}" for k, v in sorted(d.items())) + "-v2"  # v2: draft size


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency becomes white, 16-bit is scaled to 8-bit."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        arr = np.where(np.isfinite(arr), arr, 0.0)  # NaN pixels (float TIFFs): no data, black
        top = arr.max() if arr.size else 0
        if mode.startswith("I;16") or 255 < top <= 65535:
            arr = arr / 257.0
        elif top > 65535:
            arr = (arr - arr.min()) * (255.0 / max(top - arr.min(), 1))
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _largest_page(img: Image.Image, path: Path) -> Image.Image:
    """A multi-page TIFF at its largest page (its first may be a blank or a small label);
    an animation (APNG, GIF, WebP), whose frames are all one size, at its first frame, with a
    warning that the others are not read."""
    frames = getattr(img, "n_frames", 1) if img.format in ("TIFF", "PNG", "GIF", "WEBP") else 1
    if frames <= 1:
        return img
    sizes = []
    for i in range(min(frames, 64)):
        img.seek(i)
        sizes.append(img.size[0] * img.size[1])
    best = int(np.argmax(sizes))
    img.seek(best)
    if sizes.count(sizes[best]) > 1:
        log.warning("%s: %d pages or frames of one size; page %d is used, the others are not "
                    "read", path, frames, best + 1)
    return img


_regular_file = regular_file  # the one check (core.files), before every open


def _open(path: Path) -> Image.Image:
    _regular_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(path)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found", kind=NOT_FOUND) from None
    except UnidentifiedImageError:
        size = path.stat().st_size if path.exists() else 0
        why = "empty file (0 bytes)" if size == 0 else "not an image Pillow can read"
        raise ImageReadError(f"{path}: {why}") from None
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot open ({exc})") from None


def draft_size(w: int, h: int, target: int) -> tuple[int, int]:
    """What to ask JPEG's reduced decoding (``Image.draft``) for, so that it picks the smallest
    scale whose long side is not below ``target``: a 4096-px picture for 512 px decodes at 1/8.

    Pillow picks the largest scale ``k`` with ``k <= w // asked_w`` and ``k <= h // asked_h``
    and decodes ``ceil(w / k)`` x ``ceil(h / k)``; asking for the target's size rounded down
    never gives less than the target (asking one pixel more halved the scale at exact multiples).
    """
    s = target / max(w, h)
    return max(1, int(w * s + 1e-6)), max(1, int(h * s + 1e-6))


def open_rgb(path: Path, *, target: int | None, max_pixels: int) -> Image.Image:
    """Decode an image file to RGB (EXIF orientation applied); JPEGs at reduced size if ``target``."""
    img = _largest_page(_open(path), path)
    try:
        if target and img.format == "JPEG":
            img.draft("RGB", draft_size(*img.size, target))
        w, h = img.size
        if w * h > max_pixels:
            raise ImageReadError(f"{path}: {w} x {h} pixels is more than max_image_pixels "
                                 f"({max_pixels:,}); shrink it, or raise max_image_pixels",
                                 kind=TOO_LARGE)
        if img.format == "PNG" and pyspng is not None:
            fast = png_spng(path, img)
            if fast is not None:
                img.close()
                return to_rgb(fast)
        img.load()
        if img.mode == "F" and not np.isfinite(np.asarray(img)).any():
            raise ImageReadError(f"{path}: every pixel is NaN or infinite (a float image "
                                 "without data)")
        if img.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even when upright
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{path}: corrupt or truncated image ({exc})") from None
    except MemoryError:
        raise ImageReadError(f"{path}: too large to decode in memory; shrink it",
                             kind=TOO_LARGE) from None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_spng(path: Path, img: Image.Image) -> Image.Image | None:
    """An 8-bit (or palette) PNG decoded by libspng, as Pillow would give it; None where Pillow
    must decode it: 16-bit, a transparent colour or palette entry (tRNS, which pyspng does not
    apply), an EXIF chunk (orientation), or anything libspng refuses (Pillow then says what is
    wrong with the file)."""
    if img.mode not in ("RGB", "RGBA", "L", "LA", "P") or "transparency" in img.info:
        return None
    try:
        data = path.read_bytes()
    except OSError:
        return None
    # IHDR comes first: width, height, then bit depth (byte 24) and colour type (byte 25)
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 33:
        return None
    depth, colour = data[24], data[25]
    if depth != 8 and colour != 3 or b"eXIf" in data:
        return None
    alpha = img.mode in ("RGBA", "LA")
    try:
        arr = pyspng.load(data, format="RGBA" if alpha else "RGB")
    except Exception:  # noqa: BLE001 - libspng's refusal: Pillow decodes it (or says why not)
        return None
    if arr.dtype != np.uint8 or arr.shape[:2] != (img.height, img.width):
        return None
    return Image.fromarray(arr, "RGBA" if alpha else "RGB")


def fit_square(img: Image.Image, size: int) -> np.ndarray:
    """Resize (keeping the aspect ratio) so the long side is ``size``; centre on white."""
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def legacy_square(img: Image.Image, size: int) -> np.ndarray:
    """The prototype's recipe: pad to a square with black, then bicubic resize."""
    w, h = img.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (0, 0, 0))
    canvas.paste(img, (int((side - w) / 2), int((side - h) / 2)))
    return np.asarray(canvas.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
