"""inputs/decode.py: file -> model-ready pixels, the one place that decides slide or picture."""

import numpy as np
import pytest
from PIL import Image

from thumbclf.core.errors import ImageReadError
from thumbclf.inputs.decode import load_array, load_rgb, picture_array
from thumbclf.inputs.images import Preprocessing


def test_a_picture_in_memory_gives_the_array_its_file_gives(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    img.save(tmp_path / "a.png")
    prep = Preprocessing(size=32)
    from_file = load_array(tmp_path / "a.png", prep)
    assert from_file.shape == (32, 32, 3) and from_file.dtype == np.uint8
    assert np.array_equal(picture_array(img, prep), from_file)
    assert np.array_equal(picture_array(img.convert("RGBA"), prep), from_file)


def test_a_folder_that_is_not_a_dicom_slide_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="empty: a folder without DICOM slide files"):
        load_rgb(tmp_path / "empty", Preprocessing(size=32))
