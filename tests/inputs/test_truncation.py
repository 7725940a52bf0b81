"""inputs/truncation.py: a TIFF cut short (a partly copied slide) is named as such."""

import numpy as np
import tifffile

from thumbclf.inputs.truncation import truncation


def test_a_whole_tiff_passes_and_a_cut_one_is_named_truncated(tmp_path):
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, np.full((256, 256, 3), 200, np.uint8), tile=(64, 64),
                     photometric="rgb")
    assert truncation(path) is None
    data = path.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    message = truncation(cut)
    assert message is not None and message.startswith("truncated or corrupt")
    assert f"({len(data) // 2} bytes)" in message


def test_a_file_that_is_not_a_tiff_is_left_to_its_reader(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    assert truncation(tmp_path / "a.png") is None
    assert truncation(tmp_path / "missing.tif") is None
