import io

import numpy as np
import pytest
from PIL import Image

from thumbclf.core.errors import ImageReadError
from thumbclf.inputs.decode import load_array
from thumbclf.inputs.images import Preprocessing, fit_square, legacy_square, to_rgb

PREP = Preprocessing(size=32)


def save(img, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparency_becomes_white(tmp_path, mode):
    base = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    img = base.convert(mode) if mode != "PA" else base.convert("P")
    if mode == "PA":
        img.info["transparency"] = 0
        img = img.convert("P")
        img.info["transparency"] = img.getpixel((0, 0))
    arr = np.asarray(to_rgb(img))
    assert arr.shape == (8, 8, 3) and (arr == 255).all()


def test_palette_with_transparency_from_a_png_file(tmp_path):
    img = Image.new("P", (6, 6), 0)
    img.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    p = save(img, tmp_path / "p.png", transparency=0)
    arr = load_array(p, PREP)
    assert (arr == 255).all()


def test_grey_16bit_and_cmyk(tmp_path):
    g16 = Image.fromarray(np.full((10, 10), 65535, dtype=np.uint16))
    assert np.asarray(to_rgb(g16)).min() == 255
    g16 = Image.fromarray(np.full((10, 10), 257 * 100, dtype=np.uint16))
    assert set(np.unique(np.asarray(to_rgb(g16)))) == {100}
    p = save(Image.new("CMYK", (10, 10), (0, 255, 255, 0)), tmp_path / "c.jpg")
    arr = load_array(p, PREP)
    assert arr[16, 16, 0] > 200 and arr[16, 16, 1] < 60  # red
    assert np.asarray(to_rgb(Image.new("L", (4, 4), 77))).shape == (4, 4, 3)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    p = save(img, tmp_path / "r.jpg", exif=exif.tobytes())
    arr = load_array(p, Preprocessing(size=40))
    # displayed as 20 wide x 40 high: white margins left and right, blue in the middle
    assert arr[20, 2].min() > 240 and arr[20, 20, 2] > 200 and arr[2, 20, 2] > 200


def test_padding_is_white_and_centred_resize_keeps_aspect():
    img = Image.new("RGB", (100, 50), (0, 0, 0))
    arr = fit_square(img, 20)
    assert arr.shape == (20, 20, 3)
    assert (arr[:4] == 255).all() and (arr[-4:] == 255).all() and arr[10, 10].max() < 10


def test_legacy_recipe_pads_black_and_resizes_bicubic():
    img = Image.new("RGB", (100, 50), (255, 255, 255))
    arr = legacy_square(img, 20)
    assert (arr[0] < 5).all() and arr[10, 10].min() > 250
    side = Image.new("RGB", (100, 100))
    side.paste(img, (0, 25))
    assert np.array_equal(arr, np.asarray(side.resize((20, 20), Image.Resampling.BICUBIC)))


@pytest.mark.parametrize("size", [(1, 1), (1000, 3), (3, 1000)])
def test_tiny_and_extremely_thin_images(tmp_path, size):
    p = save(Image.new("RGB", size, (0, 0, 0)), tmp_path / "t.png")
    arr = load_array(p, PREP)
    assert arr.shape == (32, 32, 3) and arr.min() < 50


def test_a_jpeg_over_the_pixel_limit_is_decoded_at_reduced_size(tmp_path):
    big = Image.new("RGB", (3000, 1000), (200, 30, 30))
    p = save(big, tmp_path / "big.jpg", quality=50)
    arr = load_array(p, Preprocessing(size=64, max_pixels=1_000_000))  # 3 MP > 1 MP limit
    assert arr.shape == (64, 64, 3) and arr[32, 32, 0] > 150


def test_an_image_over_the_pixel_limit_is_refused_with_a_clear_message(tmp_path):
    p = save(Image.new("L", (200, 60), 0), tmp_path / "big.png")
    with pytest.raises(ImageReadError, match=r"200 x 60 pixels is more than max_image_pixels"):
        load_array(p, Preprocessing(size=32, max_pixels=10_000))
    assert load_array(p, Preprocessing(size=32, max_pixels=12_000)).shape == (32, 32, 3)


def test_corrupt_truncated_empty_missing_and_fake_images(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (200, 200), (1, 2, 3)).save(good, "PNG")
    (tmp_path / "trunc.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "fake.png").write_text("this is not an image")
    for name, message in [("trunc.png", "corrupt or truncated"), ("empty.jpg", "empty file"),
                          ("fake.png", "not an image"), ("missing.png", "file not found")]:
        with pytest.raises(ImageReadError, match=message):
            load_array(tmp_path / name, PREP)


def test_preprocessing_is_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    p = save(Image.fromarray(rng.integers(0, 255, (300, 500, 3), dtype=np.uint8)), tmp_path / "n.jpg")
    assert np.array_equal(load_array(p, PREP), load_array(p, PREP))


def test_a_jpeg_exactly_8x_the_target_decodes_at_one_eighth(tmp_path):
    from thumbclf.inputs.images import draft_size, open_rgb

    p = save(Image.new("RGB", (2048, 1109), (200, 30, 30)), tmp_path / "big.jpg")
    assert open_rgb(p, target=256, max_pixels=10**9).size == (256, 139)  # 1/8, not 1/4
    assert open_rgb(p, target=257, max_pixels=10**9).size == (512, 278)  # 1/8 would be below
    assert draft_size(4096, 2217, 512) == (512, 277)
    assert load_array(p, Preprocessing(size=256)).shape == (256, 256, 3)


def _png_cases(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((30, 41, 3)) * 255).astype(np.uint8))
    alpha = Image.fromarray((rng.random((30, 41)) * 255).astype(np.uint8))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    grey_alpha = rgba.convert("LA")
    cases = {"rgb": (rgb, {}), "rgba": (rgba, {}), "l": (rgb.convert("L"), {}),
             "la": (grey_alpha, {}), "p": (rgb.convert("P"), {}),
             "interlaced": (rgb, {"interlace": 1})}
    return {name: save(img, tmp_path / f"{name}.png", **kw) for name, (img, kw) in cases.items()}


def test_pngs_decode_through_libspng_to_exactly_the_arrays_pillow_gives(tmp_path, monkeypatch):
    pytest.importorskip("pyspng")
    from PIL import Image as PILImage

    from thumbclf.inputs import images

    for name, path in _png_cases(tmp_path).items():
        assert images.png_spng(path, PILImage.open(path)) is not None, name  # libspng used
        fast = load_array(path, PREP)
        with monkeypatch.context() as m:
            m.setattr(images, "pyspng", None)  # Pillow decodes it
            slow = load_array(path, PREP)
        assert np.array_equal(fast, slow), name  # tolerance: none, the same bytes


def test_pngs_libspng_leaves_to_pillow_are_decoded_by_pillow(tmp_path):
    pytest.importorskip("pyspng")
    from thumbclf.inputs import images

    deep = save(Image.fromarray(np.full((10, 10), 257 * 100, dtype=np.uint16)), tmp_path / "d.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = save(Image.new("RGB", (40, 20), (0, 0, 255)), tmp_path / "t.png", exif=exif.tobytes())
    assert images.png_spng(deep, Image.open(deep)) is None
    assert images.png_spng(turned, Image.open(turned)) is None  # orientation: Pillow's reading
    palette = Image.new("P", (6, 6), 0)
    palette.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    see_through = save(palette, tmp_path / "p.png", transparency=0)  # tRNS: pyspng ignores it
    assert images.png_spng(see_through, Image.open(see_through)) is None
    assert (load_array(see_through, PREP) == 255).all()
    assert set(np.unique(load_array(deep, PREP))) == {100}
    assert load_array(turned, Preprocessing(size=40))[2, 20, 2] > 200  # rotated to upright
    whole = save(Image.new("RGB", (50, 50), (9, 9, 9)), tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ImageReadError, match="cut.png: corrupt or truncated image"):
        load_array(tmp_path / "cut.png", PREP)


def test_a_multipage_tiff_is_read_at_its_largest_page(tmp_path, caplog):
    """Issue 24, item 11: linked subfolders, many pages, NaN pictures."""
    from PIL import Image

    from thumbclf.inputs.images import open_rgb

    blank = Image.new("RGB", (16, 16), "white")
    tissue = Image.new("RGB", (120, 90), (200, 110, 170))
    blank.save(tmp_path / "pages.tif", save_all=True, append_images=[tissue])
    img = open_rgb(tmp_path / "pages.tif", target=None, max_pixels=10**8)
    assert img.size == (120, 90) and img.getpixel((5, 5)) == (200, 110, 170)
    frames = [Image.new("RGB", (40, 40), c) for c in ("white", (200, 110, 170))]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    caplog.set_level("WARNING")
    open_rgb(tmp_path / "anim.png", target=None, max_pixels=10**8)
    assert "anim.png: 2 pages or frames of one size; page 1 is used" in caplog.text


def test_an_all_nan_float_tiff_is_an_error(tmp_path):
    """Issue 24, item 11: linked subfolders, many pages, NaN pictures."""
    from PIL import Image

    from thumbclf.core.errors import ImageReadError
    from thumbclf.inputs.images import open_rgb

    Image.fromarray(np.full((20, 20), np.nan, dtype=np.float32), "F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageReadError, match="nan.tif: every pixel is NaN or infinite"):
        open_rgb(tmp_path / "nan.tif", target=None, max_pixels=10**8)
    half = np.full((20, 20), np.nan, dtype=np.float32)
    half[:10] = 100.0
    Image.fromarray(half, "F").save(tmp_path / "half.tif")
    arr = np.asarray(open_rgb(tmp_path / "half.tif", target=None, max_pixels=10**8))
    assert arr[:10].min() == 100 and arr[10:].max() == 0
