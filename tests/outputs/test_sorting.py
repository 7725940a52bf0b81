

import hashlib

from thumbclf.core.layout import safe_component
from thumbclf.outputs.sorting import sort_copies


def make(path, data=b"abc"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_copies_never_moves_and_handles_same_names(tmp_path):
    a = make(tmp_path / "in" / "x" / "slide.png", b"one")
    b = make(tmp_path / "in" / "y" / "slide.png", b"two!")
    out = tmp_path / "res" / "sorted"
    n = sort_copies([(a, "Tumor", None), (b, "Tumor", None)], out)
    assert n == 2 and a.read_bytes() == b"one" and b.read_bytes() == b"two!"
    files = sorted(p.read_bytes() for p in (out / "Tumor").iterdir())
    assert files == [b"one", b"two!"]
    stamp = [p.stat().st_mtime_ns for p in (out / "Tumor").iterdir()]
    assert sort_copies([(a, "Tumor", None), (b, "Tumor", None)], out) == 2  # resume: kept
    assert [p.stat().st_mtime_ns for p in (out / "Tumor").iterdir()] == stamp


def test_names_cannot_escape_the_sorted_folder(tmp_path):
    src = make(tmp_path / "in" / "a.png")
    out = tmp_path / "res" / "sorted"
    sort_copies([(src, "../../evil", None), (src, "/abs", None), (src, "..", None)], out)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != src]
    assert written and all(out in p.parents for p in written)
    assert safe_component("..").startswith("_~") and "/" not in safe_component("a/b")
    assert "\\" not in safe_component("a\\b")


def test_slide_thumbnails_are_copied_and_slides_only_when_asked(tmp_path):
    slide = make(tmp_path / "in" / "s1.svs", b"slide-bytes")
    thumb = make(tmp_path / "cache" / "abc.png", b"png")
    out = tmp_path / "sorted"
    sort_copies([(slide, "Biopsy", thumb)], out)
    assert (out / "Biopsy" / "s1.png").read_bytes() == b"png"
    assert not (out / "Biopsy" / "s1.svs").exists()
    sort_copies([(slide, "Biopsy", thumb)], out, with_slides=True)
    assert (out / "Biopsy" / "s1.svs").read_bytes() == b"slide-bytes"
    assert slide.is_file()


def test_a_crafted_name_collision_never_overwrites_a_sorted_copy(tmp_path):
    """Issue 10, item 4: nothing lost."""
    def make(path, data):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    x = make(tmp_path / "in" / "x" / "slide.png", b"1")
    y = make(tmp_path / "in" / "y" / "slide.png", b"22")
    tag = hashlib.sha1(str(y).encode()).hexdigest()[:8]
    z = make(tmp_path / "in" / "z" / f"slide__{tag}.png", b"333")
    w = make(tmp_path / "in" / "w" / "SLIDE.png", b"4444")
    out = tmp_path / "sorted"
    n = sort_copies([(x, "T", None), (y, "T", None), (z, "T", None), (w, "T", None)], out)
    copies = sorted(p.read_bytes() for p in (out / "T").iterdir())
    assert n == 4 and copies == [b"1", b"22", b"333", b"4444"]
