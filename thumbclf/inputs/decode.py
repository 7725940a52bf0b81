"""File -> model-ready pixels: a slide (through OpenSlide) or a picture (through Pillow).

The one place that decides "slide or picture?"; both readers stay unaware of each other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from thumbclf.core.errors import ImageReadError
from thumbclf.inputs import slides
from thumbclf.inputs.images import (EXIF_ORIENTATION, Preprocessing, fit_square, legacy_square,
                                    open_rgb, to_rgb)


def load_rgb(path: Path, prep: Preprocessing, *, slide_cache: Path | None = None) -> Image.Image:
    """The RGB picture of an image file, or the rendered thumbnail of a slide."""
    if slides.is_slide(path):
        return slides.thumbnail(path, prep.slide_size, cache_dir=slide_cache,
                                max_pixels=prep.max_pixels, budget_s=prep.slide_budget_s)
    if path.is_dir():
        raise ImageReadError(f"{path}: a folder without DICOM slide files (.dcm); PATH must "
                             "name an image, a slide, or a DICOM slide's folder")
    target = prep.size if prep.recipe == "thumbclf" else None
    return open_rgb(path, target=target, max_pixels=prep.max_pixels)


def load_array(path: Path, prep: Preprocessing, *, slide_cache: Path | None = None) -> np.ndarray:
    """File -> preprocessed ``size`` x ``size`` x 3 uint8 array; raises ImageReadError."""
    return square(load_rgb(path, prep, slide_cache=slide_cache), prep)


def square(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """An RGB picture -> the model's square uint8 array, by the model's recipe."""
    if prep.recipe == "legacy":
        return legacy_square(img, prep.size)
    return fit_square(img, prep.size)


def picture_array(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """An in-memory picture (any mode, EXIF orientation applied) -> the model's array, as
    ``load_array`` makes it from a file."""
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    return square(to_rgb(img), prep)
