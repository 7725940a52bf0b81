"""Whole-slide images: generated pyramidal TIFFs, the real Aperio slides when present, broken slides."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REALDATA, make_pyramid, run_script, write_yaml
from thumbclf.inputs import slides
from thumbclf.inputs.decode import load_array
from thumbclf.core.errors import ImageReadError
from thumbclf.inputs.images import Preprocessing

REAL_SLIDES = sorted((REALDATA / "slides").glob("*.svs")) if REALDATA.is_dir() else []


def test_generated_pyramid_is_a_slide_with_the_right_thumbnail(tmp_path):
    p = make_pyramid(tmp_path / "s.tiff")
    assert slides.is_slide(p)
    img = slides.thumbnail(p, 600)
    assert img.size == (600, 400) and img.mode == "RGB"
    arr = np.asarray(img)
    assert tuple(arr[10, 10]) == pytest.approx((0, 0, 255), abs=30)  # top-left stays top-left
    assert tuple(arr[200, 300]) == pytest.approx((200, 100, 160), abs=30)
    props = slides.properties(p)
    assert props["slide_vendor"] == "generic-tiff" and props["slide_width"] == 3000
    assert props["slide_level_count"] >= 3


def test_large_levels_are_read_in_strips(tmp_path, monkeypatch):
    p = make_pyramid(tmp_path / "s.tiff")
    whole = np.asarray(slides.thumbnail(p, 600), dtype=int)
    monkeypatch.setattr(slides, "SINGLE_READ_PIXELS", 100_000)
    strips = np.asarray(slides.thumbnail(p, 600), dtype=int)
    assert strips.shape == whole.shape and np.abs(strips - whole).mean() < 3


def test_plain_tiff_is_read_as_an_ordinary_image(tmp_path):
    p = tmp_path / "plain.tif"
    Image.new("RGB", (50, 30), (10, 200, 10)).save(p)
    assert not slides.is_slide(p)
    assert load_array(p, Preprocessing(size=32))[16, 16, 1] > 150


def test_thumbnails_are_cached_by_slide_and_size(tmp_path):
    p = make_pyramid(tmp_path / "s.tiff")
    cache = tmp_path / "cache"
    a = slides.thumbnail(p, 500, cache_dir=cache)
    files = list(cache.glob("*.png"))
    assert len(files) == 1
    b = slides.thumbnail(p, 500, cache_dir=cache)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    slides.thumbnail(p, 300, cache_dir=cache)
    assert len(list(cache.glob("*.png"))) == 2


def test_broken_slides_are_reported(tmp_path):
    (tmp_path / "broken.svs").write_bytes(b"\x00" * 1000)
    with pytest.raises(ImageReadError, match="broken.svs: not a slide format OpenSlide supports"):
        load_array(tmp_path / "broken.svs", Preprocessing())
    (tmp_path / "s.mrxs").write_bytes(b"")
    with pytest.raises(ImageReadError, match="MIRAX data folder s/ is missing"):
        load_array(tmp_path / "s.mrxs", Preprocessing())


@pytest.mark.skipif(not REAL_SLIDES, reason="../shared/realdata is not present")
@pytest.mark.parametrize("path", REAL_SLIDES, ids=lambda p: p.name)
def test_real_aperio_slides(path):
    with Image.open(REALDATA / "thumbnails" / f"{path.stem}_thumb.png") as ref:
        ref_landscape = ref.size[0] > ref.size[1]
    img = slides.thumbnail(path, 1024)
    assert max(img.size) == 1024 and (img.size[0] > img.size[1]) == ref_landscape
    props = slides.properties(path)
    assert props["slide_vendor"] == "aperio"
    assert np.asarray(img).mean() < 250  # tissue, not blank


@pytest.mark.slow
def test_slides_and_thumbnails_train_and_deploy_together(tiny_data, tmp_path):
    data = pd.read_csv(tiny_data)
    data["PATH"] = [str(tiny_data.parent / p) for p in data["PATH"]]
    rows = []
    for i, (cls, colour) in enumerate([("Biopsy", (150, 60, 160)), ("IHC", (150, 90, 40)),
                                       ("TMA", (230, 150, 200))]):
        for k in range(2):
            p = make_pyramid(tmp_path / f"{cls}_{k}.tiff", 1200 + 200 * k, 900, colour)
            rows.append({"PATH": str(p), "CLASSIFICATION": cls, "PATIENT": f"S{i}{k}"})
    rows += [{"PATH": str(p), "CLASSIFICATION": "IHC", "PATIENT": p.stem} for p in REAL_SLIDES]
    table = pd.concat([data, pd.DataFrame(rows)])
    table.to_csv(tmp_path / "mixed.csv", index=False)
    exp = write_yaml(tmp_path / "t.yaml", f"thumbData: {tmp_path / 'mixed.csv'}\ntrainFull: true\n"
                     "pretrained: false\nbatch_size: 8\nmax_epochs: 1\nstopEpoch: 0\nbootstrap: 0\n"
                     "slide_thumbnail_size: 512\nnum_workers: 2\n")
    r = run_script("train_thumbclassifier.py", str(exp))
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "thumbclf-cache" / "slides").glob("*.png"))) == 6 + len(REAL_SLIDES)
    (tmp_path / "broken.svs").write_bytes(b"junk" * 100)
    pd.concat([table, pd.DataFrame([{"PATH": str(tmp_path / "broken.svs"),
                                     "CLASSIFICATION": "IHC", "PATIENT": "B"}])]
              ).to_csv(tmp_path / "mixed2.csv", index=False)
    dep = write_yaml(tmp_path / "d.yaml", f"thumbData: {tmp_path / 'mixed2.csv'}\n"
                     f"modelAdr: {tmp_path / 't' / 'model.pt'}\nsortThumbs: true\nsortSlides: true\n"
                     "export_thumbnails: true\nbootstrap: 0\nnum_workers: 1\n")
    r = run_script("deploy_thumbclassifier.py", str(dep))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "d"
    pred = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    slide_rows = pred[pred["PATH"].str.endswith((".tiff", ".svs")) & (pred["error"] == "")]
    assert len(slide_rows) == 6 + len(REAL_SLIDES)
    assert set(slide_rows["slide_vendor"]) <= {"generic-tiff", "aperio"}
    assert "not a slide format" in pred.loc[pred["PATH"].str.endswith("broken.svs"), "error"].item()
    assert len(list((out / "thumbnails").glob("*.png"))) == 6 + len(REAL_SLIDES)
    sorted_pngs = [p for p in (out / "sorted").rglob("*.png")]
    sorted_slides = [p for p in (out / "sorted").rglob("*") if p.suffix in (".tiff", ".svs")]
    assert len(sorted_pngs) == len(sorted_slides) == 6 + len(REAL_SLIDES)


def aperio_like(path, w=3000, h=2000):
    """A JPEG-tiled pyramid named .svs (OpenSlide reads it as a generic TIFF)."""
    import tifffile

    img = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    with tifffile.TiffWriter(path) as tw:
        for k in (1, 4, 16):
            tw.write(img[::k, ::k].copy(), tile=(256, 256), photometric="rgb", compression="jpeg",
                     description=(f"Aperio Image Library v12.0.0\n{w}x{h} |AppMag = 20|MPP = 0.5"
                                  if k == 1 else ""), subfiletype=0 if k == 1 else 1)
    return path


@pytest.mark.parametrize("keep", [0.3, 0.97])
def test_a_truncated_slide_is_named_truncated_not_an_unsupported_format(tmp_path, keep):
    """Issue 33, item 2 (and issue 31, item 6): a truncated .svs was "not a slide format
    OpenSlide supports"."""
    whole = aperio_like(tmp_path / "whole.svs")
    assert slides.properties(whole)["slide_width"] == 3000
    assert slides.truncation(whole) is None
    cut = tmp_path / "cut.svs"
    cut.write_bytes(whole.read_bytes()[:int(whole.stat().st_size * keep)])
    size = cut.stat().st_size
    with pytest.raises(ImageReadError, match=rf"cut\.svs: truncated or corrupt: the TIFF structure "
                                             rf"points past the end of the file \({size} bytes\)"):
        slides.properties(cut)


def _finishes(call, seconds: float = 20.0):
    """The call's outcome (value or exception) if it ends within ``seconds``; else fails."""
    import threading

    box: dict = {}

    def run():
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - the outcome is what is tested
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "blocked (a FIFO opened for reading waits for a writer forever)"
    return box


def test_a_fifo_slide_or_mirax_data_file_is_refused_not_waited_on(tmp_path):
    """Issue 33, item 15: a FIFO named x.svs, or a MIRAX whose data file is a FIFO, blocked
    the deploy forever; one regular-file check guards every open of every reader."""
    import os

    os.mkfifo(tmp_path / "x.svs")
    for call in (lambda: slides.thumbnail(tmp_path / "x.svs", 200),
                 lambda: slides.properties(tmp_path / "x.svs")):
        box = _finishes(call)
        assert isinstance(box.get("error"), ImageReadError)
        assert "named pipe (FIFO), not a regular file" in str(box["error"])
    data = tmp_path / "m"
    data.mkdir()
    (tmp_path / "m.mrxs").write_text("[GENERAL]\n")
    (data / "Slidedat.ini").write_text("[DATAFILE]\nFILE_COUNT = 1\nFILE_0 = Data0000.dat\n")
    os.mkfifo(data / "Data0000.dat")
    box = _finishes(lambda: slides.thumbnail(tmp_path / "m.mrxs", 200))
    assert isinstance(box.get("error"), ImageReadError)
    assert "Data0000.dat is not a regular file" in str(box["error"])


def test_a_missing_slide_is_not_found_not_unreadable(tmp_path):
    """Issue 33, item 20: a missing .svs listed in a table was tallied as unreadable (a raw
    FileNotFoundError from the cache key), not as not found."""
    import pandas as pd

    from thumbclf.outputs import tally

    errors = []
    for name in ("gone.svs", "gone.mrxs", "gone/x.dcm"):
        with pytest.raises(ImageReadError, match="file not found") as caught:
            load_array(tmp_path / name, Preprocessing(size=32), slide_cache=tmp_path / "cache")
        errors.append(caught.value)
    table = pd.DataFrame({"PATH": ["a", "b", "c"], "model_prediction": [""] * 3,
                          "undecided_reason": [""] * 3, "error": [str(e) for e in errors],
                          "error_kind": [e.kind for e in errors]})
    assert tally.counts(table) == {"not found": 3}
