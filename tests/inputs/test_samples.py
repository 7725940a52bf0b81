import logging

import pandas as pd
import pytest
from PIL import Image

from thumbclf.core.errors import DataError
from thumbclf.inputs.samples import check_class_sizes, discover


def img(path, size=(20, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 100, 150)).save(path)
    return path


def test_table_columns_are_case_insensitive_and_paths_relative_to_the_table(tmp_path):
    img(tmp_path / "imgs" / "a b.png")
    img(tmp_path / "imgs" / "ü.png")
    (tmp_path / "t.csv").write_text("path,Classification,patient\nimgs/a b.png,X,p1\nimgs\\ü.png,Y,p2\n",
                                    encoding="utf-8")
    s = discover(tmp_path / "t.csv", need_labels=True)
    assert [x.path for x in s.samples] == [tmp_path / "imgs" / "a b.png", tmp_path / "imgs" / "ü.png"]
    assert s.classes == ("X", "Y") and s.has_patients and s.samples[1].row == 3


@pytest.mark.parametrize("ext", ["tsv", "xlsx"])
def test_tsv_and_excel_tables(tmp_path, ext):
    img(tmp_path / "a.png")
    df = pd.DataFrame({"PATH": ["a.png"], "CLASSIFICATION": ["X"]})
    if ext == "tsv":
        df.to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    else:
        df.to_excel(tmp_path / "t.xlsx", index=False)
    s = discover(tmp_path / f"t.{ext}", need_labels=True)
    assert s.samples[0].path == tmp_path / "a.png" and s.samples[0].label == "X"


def test_folder_per_class_and_flat_folder(tmp_path):
    img(tmp_path / "A" / "1.png")
    img(tmp_path / "A" / "sub" / "2.jpg")
    img(tmp_path / "B" / "3.tif")
    (tmp_path / "B" / "notes.txt").write_text("x")
    s = discover(tmp_path, need_labels=True)
    assert s.counts() == {"A": 2, "B": 1}
    flat = discover(tmp_path, need_labels=False)
    assert len(flat) == 3 and all(x.label is None for x in flat.samples)


def test_images_at_top_level_of_a_labelled_folder_are_refused(tmp_path):
    img(tmp_path / "1.png")
    with pytest.raises(DataError, match="one subfolder per class"):
        discover(tmp_path, need_labels=True)


def test_target_labels_filter_and_count_the_rest(tmp_path, caplog):
    for c in "ABC":
        img(tmp_path / c / "x.png")
    with caplog.at_level(logging.INFO):
        s = discover(tmp_path, need_labels=True, target_labels=("C", "A"))
    assert s.classes == ("C", "A") and len(s) == 2
    assert "left out 1 images with labels not in target_labels: B (1)" in caplog.text


def test_labels_with_other_case_are_an_error_and_spaces_are_stripped(tmp_path):
    img(tmp_path / "a.png")
    img(tmp_path / "b.png")
    (tmp_path / "t.csv").write_text("PATH,CLASSIFICATION\na.png, Tumor \nb.png,tumor\n")
    with pytest.raises(DataError, match=r"'tumor' \(target_labels has 'Tumor'\)"):
        discover(tmp_path / "t.csv", need_labels=True, target_labels=("Tumor", "Normal"))
    (tmp_path / "t.csv").write_text("PATH,CLASSIFICATION\na.png, Tumor \nb.png,Normal\n")
    s = discover(tmp_path / "t.csv", need_labels=True, target_labels=("Tumor", "Normal"))
    assert s.labels == ["Tumor", "Normal"]


def test_duplicate_rows_are_reported_and_counted_once(tmp_path, caplog):
    img(tmp_path / "a.png")
    img(tmp_path / "b.png")
    (tmp_path / "t.csv").write_text("PATH,CLASSIFICATION\na.png,X\nb.png,Y\n./a.png,X\n")
    s = discover(tmp_path / "t.csv", need_labels=True)
    assert len(s) == 2
    assert "1 duplicate rows ignored" in caplog.text
    (tmp_path / "t.csv").write_text("PATH,CLASSIFICATION\na.png,X\na.png,Y\n")
    with pytest.raises(DataError, match="repeats row 2 .* with another label"):
        discover(tmp_path / "t.csv", need_labels=True)


def test_a_tables_problems_come_all_at_once(tmp_path):
    """Issue 31: one run names every problem of its kind, not the first one only."""
    t = tmp_path / "t.csv"
    t.write_text("FILE,LABEL\na.png,X\n")
    with pytest.raises(DataError) as err:
        discover(t, need_labels=True)
    assert [line.split(": ", 1)[1][:22] for line in err.value.lines()] == [
        "no PATH column (column", "no CLASSIFICATION colu"]
    t.write_text("PATH,CLASSIFICATION\n,X\na.png,X\n ,Y\n")
    with pytest.raises(DataError) as err:
        discover(t, need_labels=True)
    assert [line.split(": ")[1] for line in err.value.lines()] == ["row 2", "row 4"]
    for name in "abc":
        img(tmp_path / f"{name}.png")
    t.write_text("PATH,CLASSIFICATION\na.png,X\nb.png,X\na.png,Y\nc.png,X\nb.png,Z\n")
    with pytest.raises(DataError) as err:
        discover(t, need_labels=True)
    lines = err.value.lines()
    assert len(lines) == 2 and ": row 4 (" in lines[0] and "repeats row 2 (" in lines[0]
    assert ": row 6 (" in lines[1] and "repeats row 3 (" in lines[1]


def test_other_files_in_a_folder_input_are_counted(tmp_path, caplog):
    """Issue 31: files that are neither images nor slides are counted, not skipped silently;
    a MIRAX slide's data folder is part of its slide."""
    img(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "scan.pdf").write_text("x")
    (tmp_path / "m.mrxs").write_text("x")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "Data0000.dat").write_text("x")
    (tmp_path / "m" / "Slidedat.ini").write_text("x")
    with caplog.at_level(logging.INFO, logger="thumbclf.inputs.samples"):
        s = discover(tmp_path, need_labels=False)
    assert s.other_files == 2 and len(s) == 2
    assert "left out 2 files that are not images or slides (.pdf 1, .txt 1)" in caplog.text


@pytest.mark.parametrize("content, message", [
    ("", "the table is empty"),
    ("PATH,CLASSIFICATION\n", "has a header but no rows"),
    ("FILE,CLASSIFICATION\na.png,X\n", "no PATH column"),
    ("PATH,LABEL\na.png,X\n", "no CLASSIFICATION column"),
])
def test_unusable_tables(tmp_path, content, message):
    (tmp_path / "t.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        discover(tmp_path / "t.csv", need_labels=True)


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no images found"):
        discover(tmp_path, need_labels=True)
    with pytest.raises(DataError, match="no images or slides found"):
        discover(tmp_path, need_labels=False)
    with pytest.raises(DataError, match="thumbData not found"):
        discover(tmp_path / "nope", need_labels=True)


def test_class_smaller_than_the_fold_number_is_named(tmp_path):
    for i in range(3):
        img(tmp_path / "Big" / f"{i}.png")
    img(tmp_path / "Rare" / "0.png")
    s = discover(tmp_path, need_labels=True)
    with pytest.raises(DataError, match=r"class 'Rare' has 1 images, fewer than the 3 needed"):
        check_class_sizes(s, 3)
    check_class_sizes(s, 1)


def test_a_spreadsheet_that_inflates_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """Issue 24, item 13: a spreadsheet that inflates."""
    import pandas as pd

    from thumbclf.core.errors import DataError
    from thumbclf.inputs import samples

    pd.DataFrame({"PATH": ["a.png"] * 2000, "CLASSIFICATION": ["x"] * 2000}).to_excel(
        tmp_path / "t.xlsx", index=False)
    assert len(samples.read_table(tmp_path / "t.xlsx")) == 2000
    monkeypatch.setattr(samples, "MAX_UNPACKED_TABLE_BYTES", 20_000)
    monkeypatch.setattr(samples.pd, "read_excel", lambda *a, **k: pytest.fail("read"))
    with pytest.raises(DataError, match="t.xlsx: the spreadsheet unpacks to .* bytes, more than 20,000"):
        samples.read_table(tmp_path / "t.xlsx")


def test_a_linked_subfolder_of_a_folder_input_is_followed(tmp_path):
    """Issue 24, item 11: linked subfolders, many pages, NaN pictures."""
    from thumbclf.inputs import synth
    from thumbclf.inputs.samples import discover

    real = tmp_path / "elsewhere"
    synth.generate(real, per_class=3, seed=1, sides=(40, 60), classes=("IHC",))
    data = tmp_path / "data"
    synth.generate(data, per_class=1, seed=2, sides=(40, 60), classes=("IHC", "TMA"))
    (data / "labels.csv").unlink()
    (data / "IHC" / "batch2").symlink_to(real / "IHC", target_is_directory=True)
    (real / "IHC" / "loop").symlink_to(real / "IHC", target_is_directory=True)  # no endless loop
    (real / "IHC" / "up").symlink_to(data, target_is_directory=True)
    assert discover(data, need_labels=True).counts() == {"IHC": 4, "TMA": 1}
    assert len(discover(data, need_labels=False)) == 5
