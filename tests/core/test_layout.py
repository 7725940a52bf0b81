"""Names made from data, and the results-folder layout."""

from pathlib import Path

import pytest

from thumbclf.core import layout


@pytest.mark.parametrize("text", ["..", ".", "../../x", "/abs/x", "a\\b", ".hidden", "a\x1b[31m",
                                  "line\nbreak", "x" * 400, "CON", "", " . ", "é" * 200])
def test_safe_component_is_one_harmless_component(text):
    name = layout.safe_component(text)
    assert name and name not in (".", "..") and not name.startswith(".")
    assert "/" not in name and "\\" not in name
    assert all(ord(c) >= 32 and not 0x7f <= ord(c) <= 0x9f for c in name)
    assert len(name.encode()) <= layout.MAX_COMPONENT_BYTES
    assert Path(name).name == name


def test_safe_component_keeps_ordinary_names_and_separates_changed_ones():
    assert layout.safe_component("Tumor resection") == "Tumor resection"
    assert layout.safe_component("a/b") != layout.safe_component("a_b")
    assert layout.safe_component("a/b") != layout.safe_component("a:b")


def test_component_map_is_unique_even_without_case():
    names = layout.component_map(["Tumor", "tumor", "a/b", "a_b"])
    assert len({n.casefold() for n in names.values()}) == 4
    assert names["Tumor"] == "Tumor"


def test_unique_file_never_hands_out_a_name_twice(tmp_path):
    taken: set[str] = set()
    a = layout.unique_file(tmp_path, "slide", ".png", "/x/slide.png", taken)
    b = layout.unique_file(tmp_path, "slide", ".png", "/y/slide.png", taken)
    c = layout.unique_file(tmp_path, b.stem, ".png", "/z/" + b.name, taken)  # crafted collision
    d = layout.unique_file(tmp_path, "SLIDE", ".PNG", "/w/SLIDE.PNG", taken)
    assert len({str(p).casefold() for p in (a, b, c, d)}) == 4


def test_fold_folders_are_built_and_parsed_in_one_place(tmp_path):
    assert layout.fold_dir(tmp_path, 0).name == "full" and layout.fold_dir(tmp_path, 3).name == "fold_3"
    for k in (0, 1, 12):
        assert layout.fold_of(layout.fold_dir(tmp_path, k)) == k
    assert layout.fold_of(tmp_path / "fold_x") is None
    for k in (2, 10, 1):
        layout.fold_dir(tmp_path, k).mkdir()
        (layout.fold_dir(tmp_path, k) / "model.pt").write_bytes(b"")
    assert [p.parent.name for p in layout.model_files_in(tmp_path)] == ["fold_1", "fold_2", "fold_10"]
    assert layout.fold_model(tmp_path, 0) == tmp_path / "model.pt"


def test_a_backslash_in_a_linux_file_name_is_part_of_the_name(tmp_path):
    """Issue 33, item 16: --apply read a backslash in a Linux file name as a Windows
    separator: the slide could never be corrected, and it blocked the whole table."""
    import os

    if os.sep != "/":
        pytest.skip("POSIX file names")
    odd = tmp_path / "scan\\2024.png"
    odd.write_bytes(b"x")
    assert layout.to_local_path(str(odd), Path("/elsewhere")) == odd
    assert layout.to_local_path("scan\\2024.png", tmp_path) == odd
    assert layout.to_local_path("sub\\x.png", tmp_path) == tmp_path / "sub" / "x.png"
    assert layout.to_local_path("C:\\data\\x.png", tmp_path).as_posix().endswith("C:/data/x.png")


def test_class_folders_do_not_depend_on_the_order_classes_come_in():
    """Issue 33, item 20: a class 'undecided' next to 'Undecided' made the folder depend on the
    corrections' order."""
    one = layout.component_map(["undecided", "Undecided", "IHC"])
    other = layout.component_map(["IHC", "Undecided", "undecided"])
    assert one == other and one["Undecided"] == "Undecided"
    assert one["undecided"].casefold() != "undecided"
