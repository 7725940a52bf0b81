"""inputs/dicom.py: DICOM WSI folders and files, read within bounds."""

import time

import pytest

from thumbclf.inputs import tiles


def test_a_dicom_level_claiming_millions_of_frames_is_refused_before_they_are_listed(tmp_path):
    """A 722-byte DICOM of 20,000,000 one-pixel frames: its frames were listed (and read)
    before any bound was checked."""
    from thumbclf.inputs import dicom

    source = tmp_path / "tiny.dcm"
    source.write_bytes(b"\x00" * 722)
    inst = dicom.Instance(path=source, series="1", image_type=("ORIGINAL", "PRIMARY", "VOLUME"),
                          width=20_000, height=1_000, tile_w=1, tile_h=1, frames=20_000_000,
                          syntax="1.2.840.10008.1.2.4.50", photometric="YBR_FULL_422",
                          tiled_full=True, pixel_offset=0)
    started = time.perf_counter()
    with pytest.raises(tiles.SlideTooLarge, match=r"20,000,000 frames in the level read"):
        dicom.tiled_level(dicom.Level((inst,)))
    assert time.perf_counter() - started < 1.0
