import os

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_TRAIN, run_script, write_yaml
from thumbclf.inputs import cache
from thumbclf.inputs.images import Preprocessing

FAST = TINY_TRAIN  # the one fast settings block (conftest)
PREP = Preprocessing(size=32)


def images(tmp_path, n=5):
    paths = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (40 + i, 30), (i * 40, 10, 10)).save(p)
        paths.append(p)
    return paths


def test_memory_cache_decodes_every_image_once_and_records_failures(tmp_path):
    paths = images(tmp_path) + [tmp_path / "missing.png"]
    d = cache.build(paths, PREP, mode="memory", workers=2, progress=False)
    assert d.array.shape == (6, 32, 32, 3) and list(d.ok) == [True] * 5 + [False]
    assert "file not found" in d.errors[5]
    assert d.get(np.array([3]))[0, 16, 16, 0] == 120


def test_disk_cache_is_reused_only_for_unchanged_files(tmp_path):
    paths = images(tmp_path)
    first = cache.build(paths, PREP, mode="disk", cache_dir=tmp_path / "c", workers=0, progress=False)
    assert isinstance(first.array, np.memmap)
    again = cache.build(paths, PREP, mode="disk", cache_dir=tmp_path / "c", workers=0, progress=False)
    assert np.array_equal(again.rows, first.rows)  # nothing decoded again
    Image.new("RGB", (40, 30), (0, 200, 0)).save(paths[2])
    os.utime(paths[2], ns=(1, 1))
    changed = cache.build(paths, PREP, mode="disk", cache_dir=tmp_path / "c", workers=0, progress=False)
    assert changed.rows[2] != first.rows[2] and changed.get(np.array([2]))[0, 16, 16, 1] == 200
    assert np.array_equal(changed.get(np.array([0, 1])), first.get(np.array([0, 1])))
    other = cache.build(paths, Preprocessing(size=16), mode="disk", cache_dir=tmp_path / "c",
                        workers=0, progress=False)
    assert other.array.shape[1] == 16  # other preprocessing, other cache


def test_disk_cache_does_not_grow_with_unreadable_images(tmp_path):
    paths = images(tmp_path) + [tmp_path / "missing.png"]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    paths.append(tmp_path / "bad.png")
    sizes = []
    for _ in range(3):
        d = cache.build(paths, PREP, mode="disk", cache_dir=tmp_path / "c", workers=0, progress=False)
        assert sorted(d.errors) == [5, 6] and list(d.ok) == [True] * 5 + [False] * 2
        sizes.append(sum(p.stat().st_size for p in (tmp_path / "c").rglob("images.u8")))
    assert sizes[0] == sizes[1] == sizes[2] == 5 * 32 * 32 * 3
    assert (d.get(np.array([5, 6])) == 255).all()  # unreadable: white, never another image
    assert d.get(np.array([3]))[0, 16, 16, 0] == 120


@pytest.mark.slow
def test_an_unusable_cache_dir_is_one_line_before_anything_is_written(tiny_data, tmp_path):
    """Issue 10, item 10: nothing lost. A fresh process, as a user's: matplotlib, imported after
    its cache was pointed into the unusable folder, added a warning of its own (session 6)."""
    (tmp_path / "blocker").write_text("a file, not a folder")
    exp = write_yaml(tmp_path / "e.yaml", f"thumbData: {tiny_data}\ntrainFull: true\n{FAST}"
                     f"cache: disk\ncache_dir: {tmp_path / 'blocker' / 'cache'}\n")
    r = run_script("train_thumbclassifier.py", str(exp), process=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot write the cache folder" in r.stderr and "blocker" in r.stderr
    assert not (tmp_path / "e").exists()
