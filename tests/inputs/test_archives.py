"""Real archives: DICOM folders as one slide, single-level JPEG slides in bounded memory, MIRAX
with a missing data file, the per-slide budget, every input accounted for."""

from __future__ import annotations

import inspect
import os
import shutil
import sys
import time
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from conftest import REALDATA, run_script, write_yaml
from thumbclf.core.errors import ImageReadError
from thumbclf.inputs import slides, tiles
from thumbclf.inputs.decode import load_array
from thumbclf.inputs.images import Preprocessing
from thumbclf.inputs.samples import discover
from thumbclf.outputs import sorting

pydicom = pytest.importorskip("pydicom")
REAL_JPEG_SLIDES = [p for p in sorted((REALDATA / "slides").glob("*.svs"))
                    if REALDATA.is_dir() and tifffile.TiffFile(p).pages[0].compression == 7]


def picture(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A slide-like picture: pale background, two tissue blobs, a blue mark top-left, texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), 240, np.uint8)
    blob = ((x - w * 0.35) / (w * 0.2)) ** 2 + ((y - h * 0.5) / (h * 0.3)) ** 2 < 1
    img[blob] = (190, 90, 150)
    img[(((x - w * 0.7) / (w * 0.12)) ** 2 + ((y - h * 0.4) / (h * 0.2)) ** 2) < 1] = (120, 60, 40)
    img[: h // 8, : w // 10] = (20, 20, 230)
    noise = rng.integers(-12, 12, (h // 16 + 1, w // 16 + 1, 1))
    return np.clip(img + np.kron(noise, np.ones((16, 16, 1)))[:h, :w], 0, 255).astype(np.uint8)


def jpeg_tiff(path, img: np.ndarray, *, pyramid: bool, tile: int = 256, mpp: float = 0.5):
    """A JPEG-tiled TIFF of ``img``: a pyramid (levels /2) or a single level."""
    with tifffile.TiffWriter(path) as tw:
        level, k = img, 1
        while True:
            res = 1e4 / (mpp * k)
            tw.write(level, tile=(tile, tile), photometric="rgb", compression="jpeg",
                     compressionargs={"level": 90}, resolution=(res, res),
                     resolutionunit="CENTIMETER", subfiletype=0 if k == 1 else 1)
            if not pyramid or max(level.shape[:2]) <= 400:
                break
            level, k = np.asarray(Image.fromarray(level).reduce(2)), k * 2
    return path


def dicom_slide(folder, src_tiff, *, label: bool = True):
    """A DICOM WSI folder written by wsidicomizer from a TIFF, plus a LABEL and a THUMBNAIL
    instance (copies of the smallest level with another ImageType)."""
    wsidicomizer = pytest.importorskip("wsidicomizer")
    folder.mkdir(parents=True)
    wsidicomizer.WsiDicomizer.convert(src_tiff, folder, tile_size=256, workers=1,
                                      include_label=False, include_overview=False)
    if label:
        smallest = min(folder.glob("*.dcm"), key=lambda p: p.stat().st_size)
        ds = pydicom.dcmread(smallest)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / "label.dcm")
        ds.ImageType = ["DERIVED", "PRIMARY", "THUMBNAIL", "RESAMPLED"]
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / "thumbnail.dcm")
    return folder


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """patient folders: a pyramid, a DICOM slide (with a label), a single-level slide."""
    root = tmp_path_factory.mktemp("archive")
    src = tmp_path_factory.mktemp("src")
    (root / "P1").mkdir()
    jpeg_tiff(root / "P1" / "s1.tiff", picture(1500, 1000), pyramid=True)
    tiff = jpeg_tiff(src / "d.tiff", picture(1500, 1000, 1), pyramid=True)
    dicom_slide(root / "P2" / "slide-7", tiff)
    (root / "P3").mkdir()
    jpeg_tiff(root / "P3" / "flat.tiff", picture(2048, 1536, 2), pyramid=False)
    return root


def test_a_dicom_folder_is_one_row_from_a_folder_and_from_a_table(archive, tmp_path):
    found = discover(archive, need_labels=False)
    names = sorted(s.path.relative_to(archive).as_posix() for s in found.samples)
    assert names == ["P1/s1.tiff", "P2/slide-7", "P3/flat.tiff"]
    folder = archive / "P2" / "slide-7"
    one_file = sorted(folder.glob("1.*.dcm"))[0]
    pd.DataFrame({"PATH": [str(folder), str(one_file)]}).to_csv(tmp_path / "t.csv", index=False)
    rows = discover(tmp_path / "t.csv", need_labels=False).samples
    a, b = (load_array(s.path, Preprocessing(size=64), slide_cache=tmp_path / "c") for s in rows)
    assert np.array_equal(a, b) and a[32, 20].tolist() != [255, 255, 255]
    props = slides.properties(one_file)
    assert props["slide_vendor"] == "dicom" and props["slide_width"] == 1500
    assert props["slide_level_count"] >= 3 and props["slide_mpp_x"] == pytest.approx(0.5)


def test_a_label_instance_is_never_opened_for_pixels(archive, tmp_path, monkeypatch):
    folder = archive / "P2" / "slide-7"
    label = (folder / "label.dcm").resolve()
    opened: list[list[str]] = []

    def hook(event, args):
        if event == "open" and args and str(args[0]) == str(label):
            opened.append([f.function for f in inspect.stack()[1:8]])

    monkeypatch.setattr(slides, "_openslide", lambda: pytest.fail("OpenSlide read a DICOM file"))
    watching.append(hook)
    try:
        img = slides.thumbnail(folder, 256, cache_dir=tmp_path / "c")
        slides.properties(folder)
        sorting.sort_copies([(folder, "IHC", slides.cached_thumbnail(folder, 256, tmp_path / "c"))],
                            tmp_path / "sorted", with_slides=True)
    finally:
        watching.remove(hook)
    assert opened and all("read_header" in stack for stack in opened)  # headers only
    copied = tmp_path / "sorted" / "IHC" / "slide-7"
    assert sorted(p.name for p in copied.iterdir()) == sorted(
        p.name for p in folder.iterdir() if p.name != "label.dcm")
    assert np.asarray(img).mean() < 235  # the slide's tissue, read from its volume frames


watching: list = []
sys.addaudithook(lambda event, args: [h(event, args) for h in list(watching)])


def test_two_series_or_a_missing_level_give_a_clear_error(archive, tmp_path):
    folder = tmp_path / "two"
    shutil.copytree(archive / "P2" / "slide-7", folder)
    other = dicom_slide(tmp_path / "other", jpeg_tiff(tmp_path / "o.tiff", picture(600, 400),
                                                      pyramid=False), label=False)
    for p in other.glob("*.dcm"):
        shutil.copy(p, folder / f"x-{p.name}")
    with pytest.raises(ImageReadError, match=r"two: holds 2 DICOM WSI series .*own folder"):
        load_array(folder, Preprocessing(size=32))
    cut = tmp_path / "cut"
    shutil.copytree(archive / "P2" / "slide-7", cut)
    base = max(cut.glob("1.*.dcm"), key=lambda p: p.stat().st_size)
    base.unlink()
    with pytest.raises(ImageReadError, match="incomplete DICOM slide: the full-resolution level"):
        load_array(cut, Preprocessing(size=32))
    pd.DataFrame({"PATH": [str(tmp_path)]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ImageReadError, match="a folder without DICOM slide files"):
        load_array(tmp_path, Preprocessing(size=32))


def test_single_level_slide_is_read_at_reduced_scale_and_matches_its_pyramid(tmp_path):
    img = picture(4096, 3072, 5)
    flat = jpeg_tiff(tmp_path / "flat.tiff", img, pyramid=False)
    pyr = jpeg_tiff(tmp_path / "pyr.tiff", img, pyramid=True)
    stats = tiles.ReadStats()
    tracemalloc.start()
    thumb = slides.thumbnail(flat, 512, stats=stats)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert stats.reader == "tiff tiles" and stats.dct_scale == 8
    # decoded: 1/64 of the level's 12.6 megapixels; held at once: the thumbnail-sized canvas
    assert stats.decoded_pixels <= 4096 * 3072 / 64 and stats.canvas_pixels <= 4 * 512 * 384
    assert peak < 4_000_000  # Python-side bytes (tiles are read one at a time)
    ref = np.asarray(slides.thumbnail(pyr, 512), dtype=float)
    diff = np.abs(np.asarray(thumb, dtype=float) - ref)
    assert thumb.size == (512, 384)
    assert diff.mean() < 3.0 and np.percentile(diff, 99) < 24  # of 255; JPEG and filter noise


def test_a_slide_over_the_budget_is_reported_too_large(tmp_path, monkeypatch):
    flat = jpeg_tiff(tmp_path / "flat.tiff", picture(1024, 768), pyramid=False)
    with pytest.raises(tiles.SlideTooLarge, match=r"flat.tiff: too large: reading stopped after "
                       r"0 s, the per-slide budget .*raise slide_budget_s"):
        slides.thumbnail(flat, 256, budget_s=0)
    zlib = tmp_path / "zlib.tiff"
    tifffile.imwrite(zlib, picture(1024, 768), tile=(256, 256), photometric="rgb",
                     compression="zlib")
    assert slides.is_slide(zlib)
    with pytest.raises(tiles.SlideTooLarge, match="too large: its smallest usable level has "
                                                  "1024 x 768 pixels, more than max_image_pixels"):
        load_array(zlib, Preprocessing(size=32, max_pixels=100_000))


def test_mirax_names_the_missing_data_file(tmp_path):
    (tmp_path / "s.mrxs").write_bytes(b"")
    (tmp_path / "s").mkdir()
    with pytest.raises(ImageReadError, match="MIRAX index s/Slidedat.ini is missing"):
        load_array(tmp_path / "s.mrxs", Preprocessing())
    (tmp_path / "s" / "Slidedat.ini").write_text(
        "[GENERAL]\nSLIDE_ID=1\n[DATAFILE]\nFILE_COUNT=2\nFILE_0=Data0000.dat\nFILE_1=Data0001.dat\n")
    (tmp_path / "s" / "Data0000.dat").write_bytes(b"x")
    with pytest.raises(ImageReadError, match="MIRAX data file s/Data0001.dat is missing"):
        load_array(tmp_path / "s.mrxs", Preprocessing())


@pytest.mark.skipif(not REAL_JPEG_SLIDES, reason="no JPEG slides in ../shared/realdata/slides")
@pytest.mark.parametrize("path", REAL_JPEG_SLIDES, ids=lambda p: p.name)
def test_real_jpeg_slides_read_as_openslide_reads_them(path):
    stats = tiles.ReadStats()
    img = slides.thumbnail(path, 512, stats=stats)
    osl = slides._openslide().OpenSlide(str(path))
    ref = osl.get_thumbnail(img.size).convert("RGB").resize(img.size)
    osl.close()
    assert stats.reader == "tiff tiles"
    assert np.abs(np.asarray(img, dtype=float) - np.asarray(ref, dtype=float)).mean() < 4.0


@pytest.mark.slow
def test_a_mixed_archive_deploys_with_one_row_per_slide(archive, tiny_data, tmp_path, monkeypatch):
    mixed = tmp_path / "mixed"
    shutil.copytree(archive, mixed)
    (mixed / "P4").mkdir()
    (mixed / "P4" / "broken.svs").write_bytes(b"junk" * 100)
    (mixed / "P4" / "m.mrxs").write_bytes(b"")
    (mixed / "P4" / "m").mkdir()
    (mixed / "P4" / "m" / "Slidedat.ini").write_text("[DATAFILE]\nFILE_0=Data0000.dat\n")
    model = tmp_path / "t"
    exp = write_yaml(tmp_path / "t.yaml", f"thumbData: {tiny_data}\ntrainFull: true\n"
                     "pretrained: false\nbatch_size: 8\nmax_epochs: 1\nstopEpoch: 0\n"
                     "bootstrap: 0\nslide_thumbnail_size: 256\n")
    assert run_script("train_thumbclassifier.py", str(exp)).returncode == 0
    dep = write_yaml(tmp_path / "d.yaml", f"thumbData: {mixed}\nhasLabels: false\n"
                     f"modelAdr: {model / 'model.pt'}\nsortThumbs: true\nsortSlides: true\n"
                     "num_workers: 0\ngradcam: 1\nslide_budget_s: 45\n")
    budgets = []  # the key reaches the slide reader (this deploy runs in this process)
    monkeypatch.setattr(slides, "_deadline", lambda b: budgets.append(b) or time.perf_counter() + b)
    r = run_script("deploy_thumbclassifier.py", str(dep))
    assert r.returncode == 0, r.stderr
    assert budgets and set(budgets) == {45.0}
    pred = pd.read_csv(tmp_path / "d" / "predictions.csv", keep_default_na=False)
    rel = sorted(pred["PATH"].map(lambda p: str(p).replace(str(mixed) + "/", "")))
    assert rel == ["P1/s1.tiff", "P2/slide-7", "P3/flat.tiff", "P4/broken.svs", "P4/m.mrxs"]
    row = pred[pred["PATH"].str.endswith("slide-7")].iloc[0]
    assert row["error"] == "" and row["slide_vendor"] == "dicom" and float(row["slide_width"]) == 1500
    # issue 30: the read record of each slide, DICOM's photometric interpretation among it
    assert row["read_reader"] == "dicom frames" and row["read_photometric"].startswith("YBR")
    assert int(row["read_bytes"]) > 0 and float(row["read_seconds"]) > 0
    assert int(row["read_level_width"]) * (2 ** int(row["read_level"])) == 1500
    assert row["read_mpp_source"] == "header" and float(row["read_mpp"]) > 0
    flat = pred[pred["PATH"].str.endswith("flat.tiff")].iloc[0]
    assert flat["read_reader"] == "tiff tiles" and flat["read_photometric"] == ""
    assert "How the slides were read: 3 slides read" in (tmp_path / "d" / "report.html").read_text()
    assert "Data0000.dat is missing" in pred.loc[pred["PATH"].str.endswith("m.mrxs"), "error"].item()
    assert pred.loc[pred["PATH"].str.endswith("m.mrxs"), "error_kind"].item() == "incomplete"
    copies = [p for p in (tmp_path / "d" / "sorted").rglob("*.dcm")]
    assert copies and not any(p.name == "label.dcm" for p in copies)
    assert "every input accounted for: 5 rows" in r.stderr and "slowest slides:" in r.stderr
    assert "Every input accounted for" in (tmp_path / "d" / "report.html").read_text()


def test_many_tiles_are_decoded_in_threads_to_the_same_picture(tmp_path, monkeypatch):
    flat = jpeg_tiff(tmp_path / "flat.tiff", picture(2048, 1536, 4), pyramid=False)
    one = np.asarray(slides.thumbnail(flat, 256))
    monkeypatch.setattr(tiles, "MANY_TILES", 1)
    monkeypatch.setenv("THUMBCLF_TILE_THREADS", "2")
    assert tiles.decode_threads(48) == min(2, os.cpu_count())
    assert np.array_equal(np.asarray(slides.thumbnail(flat, 256)), one)


def abbreviated(stream: bytes) -> tuple[bytes, bytes]:
    """A complete JPEG split as a TIFF stores it: (JPEGTables: SOI, DQT, DHT, EOI; the tile:
    SOI, the other segments, the scan), as Aperio writes RGB: no Adobe marker, and components
    numbered 1, 2, 3 (not "R", "G", "B", from which libjpeg would guess RGB)."""
    tables, tile, i = [b"\xff\xd8"], [b"\xff\xd8"], 2
    while stream[i + 1] != 0xDA:  # up to the start of scan
        marker, size = stream[i + 1], int.from_bytes(stream[i + 2:i + 4], "big")
        segment = stream[i:i + 2 + size]
        if marker in (0xDB, 0xC4):
            tables.append(segment)
        elif marker == 0xC0:  # start of frame: components 1, 2, 3
            tile.append(segment[:10] + b"\x01" + segment[11:13] + b"\x02" + segment[14:16]
                        + b"\x03" + segment[17:])
        elif marker != 0xEE:
            tile.append(segment)
        i += 2 + size
    scan = stream[i:i + 5] + b"\x01" + stream[i + 6:i + 7] + b"\x02" + stream[i + 8:i + 9] \
        + b"\x03" + stream[i + 10:]  # the scan's header names the components too
    return b"".join(tables) + b"\xff\xd9", b"".join(tile) + scan


@pytest.mark.parametrize("rgb", [True, False])
def test_tiles_decode_alike_through_simplejpeg_and_pillow(monkeypatch, rgb):
    """simplejpeg and the Pillow fallback read a TIFF's abbreviated JPEG tiles (its tables
    spliced in; RGB components, as Aperio writes them, marked as such) to the same colours,
    at every DCT scale."""
    imagecodecs = pytest.importorskip("imagecodecs")
    img = picture(256, 256, 3)
    stream = imagecodecs.jpeg8_encode(img, level=95, outcolorspace="RGB" if rgb else None)
    tables, data = abbreviated(stream)
    assert tiles._simplejpeg() is not None  # a core dependency where it has a wheel
    for scale in (1, 2, 4, 8):
        fast = tiles.decode_jpeg(data, tables=tables, rgb=rgb, scale=scale)
        monkeypatch.setattr(tiles, "_simplejpeg", lambda: None)
        slow = tiles.decode_jpeg(data, tables=tables, rgb=rgb, scale=scale)
        monkeypatch.undo()
        assert fast.shape == slow.shape == (256 // scale, 256 // scale, 3)
        want = np.asarray(Image.fromarray(img).reduce(scale), dtype=float)
        assert np.abs(fast - want).mean() < 4 and np.abs(fast.astype(float) - slow).mean() < 2


def restored(src, dst, how: str):
    """A copy of a DICOM slide folder with its volume instances stored another way: "native"
    (uncompressed RGB frames), "sparse" (TILED_SPARSE: frames in reverse order with their
    positions, tile (1, 0) of each level not stored) or "split" (each level a concatenation
    of two instances)."""
    from pydicom.dataset import Dataset
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import generate_uid

    dst.mkdir()
    for p in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(p)
        n = int(ds.get("NumberOfFrames", 1))
        if ds.ImageType[2] != "VOLUME" or n < 2:
            shutil.copy(p, dst / p.name)
            continue
        frames = list(generate_frames(ds.PixelData, number_of_frames=n))
        if how == "native":
            rgb = str(ds.PhotometricInterpretation) == "RGB"
            ds.set_pixel_data(np.stack([tiles.decode_jpeg(f, tables=None, rgb=rgb, scale=1)
                                        for f in frames]), "RGB", 8)
            ds.save_as(dst / p.name)
        elif how == "sparse":
            cols = -(-int(ds.TotalPixelMatrixColumns) // int(ds.Columns))
            order = [k for k in range(n) if k != 1][::-1]
            per = []
            for k in order:
                pos = Dataset()
                pos.ColumnPositionInTotalImagePixelMatrix = (k % cols) * int(ds.Columns) + 1
                pos.RowPositionInTotalImagePixelMatrix = (k // cols) * int(ds.Rows) + 1
                item = Dataset()
                item.PlanePositionSlideSequence = [pos]
                per.append(item)
            ds.PerFrameFunctionalGroupsSequence = per
            ds.DimensionOrganizationType = "TILED_SPARSE"
            ds.NumberOfFrames = len(order)
            ds.PixelData = encapsulate([frames[k] for k in order])
            ds.save_as(dst / p.name)
        else:
            uid, half = generate_uid(), n // 2
            for part, (a, b) in enumerate(((0, half), (half, n)), 1):
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                ds.ConcatenationUID, ds.InConcatenationNumber = uid, part
                ds.InConcatenationTotalNumber, ds.ConcatenationFrameOffsetNumber = 2, a
                ds.NumberOfFrames = b - a
                ds.PixelData = encapsulate(frames[a:b])
                ds.save_as(dst / f"{p.stem}-{part}.dcm")
    return dst


@pytest.mark.parametrize("how", ["native", "sparse", "split"])
def test_uncompressed_sparse_and_split_dicom_levels_read_as_the_tiled_full_one(archive, tmp_path,
                                                                             how):
    src = archive / "P2" / "slide-7"
    folder = restored(src, tmp_path / how, how)
    want = np.asarray(slides.thumbnail(src, 1500))  # level 0 (1,500 x 1,000) at full scale
    stats = tiles.ReadStats()
    got = np.asarray(slides.thumbnail(folder, 1500, stats=stats))
    assert stats.reader == "dicom frames" and stats.level == 0 and got.shape == want.shape
    if how == "sparse":  # the tile not stored is glass (white); the rest where it belongs
        assert (got[:256, 256:512] == 255).all() and stats.tiles == 23
        got, want = got.copy(), want.copy()
        got[:256, 256:512] = want[:256, 256:512] = 0
    assert np.abs(got.astype(int) - want).max() <= 1
    assert len(slides.properties(folder)) and discover(folder, need_labels=False).samples
