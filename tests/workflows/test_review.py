"""workflows/review.py: ``thumbclf review``, the page written from a results folder, and
--apply: the reviewed table and sorted copies from the corrections."""

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import results_folder
from thumbclf import cli
from thumbclf.outputs import review_page
from thumbclf.workflows import review as review_flow

CLASSES = ["Biopsy", "IHC", "TMA"]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def corrections_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    pd.DataFrame(rows, columns=["PATH", "CLASSIFICATION"]).to_csv(path, index=False)
    return path


def test_apply_writes_the_reviewed_table_and_sorted_copies_and_twice_changes_nothing(tmp_path):
    folder = results_folder(tmp_path, ["a", "b", "c", "d", "e"])
    table = pd.read_csv(folder / "predictions.csv", keep_default_na=False)
    paths = dict(zip([Path(p).stem for p in table["PATH"]], table["PATH"]))
    decided_e = table["model_prediction"][4]
    other = next(c for c in CLASSES if c != decided_e)
    csv = corrections_csv(tmp_path / "corrections.csv",
                          [(paths["a"], "IHC"), (paths["b"], "Undecided"), (paths["e"], other)])
    sources = snapshot(tmp_path / "slides")
    assert cli.command(["review", str(folder), "--apply", str(csv), "--quiet"]) == 0
    reviewed = pd.read_csv(folder / "reviewed_predictions.csv", keep_default_na=False)
    assert list(reviewed["model_prediction"]) == list(table["model_prediction"])  # kept
    assert list(reviewed["reviewed_class"]) == ["IHC", "Undecided", "Undecided", table["model_prediction"][3], other]
    copies = sorted(p.relative_to(folder / "sorted").as_posix() for p in (folder / "sorted").rglob("*.png"))
    assert len(copies) == 2 and {c.split("__")[0] for c in copies} == {"IHC/a", f"{other}/e"}
    copy_a = next(c for c in copies if c.startswith("IHC/a__"))
    assert (folder / "sorted" / copy_a).read_bytes() == Path(paths["a"]).read_bytes()
    before = snapshot(folder)
    assert cli.command(["review", str(folder), "--apply", str(csv), "--quiet"]) == 0
    assert snapshot(folder) == before       # idempotent: nothing rewritten, nothing added
    assert snapshot(tmp_path / "slides") == sources  # the inputs are never touched


def test_apply_refuses_other_corrections_and_unknown_slides_with_one_line(tmp_path, capsys):
    folder = results_folder(tmp_path, ["a", "b", "c", "d"])
    paths = pd.read_csv(folder / "predictions.csv")["PATH"].tolist()
    first = corrections_csv(tmp_path / "one.csv", [(paths[0], "IHC")])
    assert cli.command(["review", str(folder), "--apply", str(first), "--quiet"]) == 0
    second = corrections_csv(tmp_path / "two.csv", [(paths[0], "TMA")])
    capsys.readouterr()
    assert cli.command(["review", str(folder), "--apply", str(second), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "reviewed_predictions.csv: exists" in err
    stranger = tmp_path / "stranger.png"
    Image.new("RGB", (20, 20)).save(stranger)
    third = corrections_csv(tmp_path / "three.csv", [(paths[1], "IHC"), (str(stranger), "TMA")])
    assert cli.command(["review", str(folder), "--apply", str(third), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"three\.csv row 3 .*stranger\.png", err)
    fourth = corrections_csv(tmp_path / "four.csv", [(paths[1], "Fat")])
    assert cli.command(["review", str(folder), "--apply", str(fourth), "--quiet"]) == 2
    assert "four.csv row 2 ('Fat')" in capsys.readouterr().err


def test_review_of_a_folder_without_predictions_is_one_line_exit_2(tmp_path, capsys):
    assert cli.command(["review", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no predictions.csv" in err
    assert list(tmp_path.iterdir()) == []   # nothing written


def test_writing_the_page_again_keeps_the_previews_and_touches_nothing_else(tmp_path):
    folder = results_folder(tmp_path, ["a", "b", "c"])
    own = {"predictions.csv", "config.yaml", "run.log"}
    run_files = {k: v for k, v in snapshot(folder).items() if k in own}
    inputs = snapshot(tmp_path / "slides")
    assert cli.command(["review", str(folder), "--quiet"]) == 0
    previews = {k: v for k, v in snapshot(folder).items() if k.startswith("review/previews/")}
    assert len(previews) == 6
    assert cli.command(["review", str(folder), "--quiet"]) == 0
    after = snapshot(folder)
    assert {k: v for k, v in after.items() if k.startswith("review/previews/")} == previews
    assert {k: v for k, v in after.items() if k in own} == run_files
    assert set(after) == own | set(previews) | {"review/index.html"}
    assert snapshot(tmp_path / "slides") == inputs and set(tmp_path.iterdir()) == {
        tmp_path / "slides", folder}


def test_review_is_a_subcommand_with_its_options(capsys):
    with pytest.raises(SystemExit):
        cli.command(["--help"])
    assert "\n    review " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.command(["review", "--help"])
    out = capsys.readouterr().out
    assert all(o in out for o in ("--serve", "--port", "--apply", "127.0.0.1"))
    assert cli.command(["review", "x", "--serve", "--apply", "c.csv"]) == 2


def test_review_names_its_page_once_and_says_how_to_serve_it(tmp_path, capsys):
    """Issue 31: the page's line is printed once (it was printed and logged)."""
    from thumbclf.core.logs import remove_handlers

    folder = results_folder(tmp_path, [f"s{i}" for i in range(6)])
    try:
        assert cli.command(["review", str(folder)]) == 0
    finally:
        remove_handlers()
    said = capsys.readouterr()
    console = said.out + said.err
    assert console.count("review page: ") == 1, console
    assert f"serve it with: thumbclf review {folder} --serve" in console


def test_the_python_api_writes_the_page_and_applies_corrections(tmp_path):
    from thumbclf import api

    folder = results_folder(tmp_path, ["a", "b", "c"])
    assert api.review(folder) == folder / "review" / "index.html"
    path = pd.read_csv(folder / "predictions.csv")["PATH"][0]
    csv = corrections_csv(tmp_path / "c.csv", [(path, "TMA")])
    assert api.apply_corrections(folder, csv) == folder / "reviewed_predictions.csv"
    assert pd.read_csv(folder / "reviewed_predictions.csv")["reviewed_class"][0] == "TMA"


def test_a_slides_preview_and_reviewed_copy_are_its_rendered_thumbnail(tmp_path):
    from conftest import make_pyramid

    folder = results_folder(tmp_path, ["a", "b", "c"])
    slide = make_pyramid(tmp_path / "slides" / "slide one.tiff", colour=(40, 160, 60))
    table = pd.read_csv(folder / "predictions.csv", keep_default_na=False)
    table.loc[0, "PATH"] = str(slide)
    table.to_csv(folder / "predictions.csv", index=False)
    assert cli.command(["review", str(folder), "--quiet"]) == 0
    large = review_page.preview_files(folder / "review", str(slide))["b"]
    with Image.open(large) as img:
        assert img.size[0] == 800 and abs(img.size[1] - 533) <= 1  # the whole slide, 3:2
        arr = np.asarray(img.convert("RGB"))
    assert tuple(arr[10, 10]) == pytest.approx((0, 0, 255), abs=40)   # its top-left mark
    assert tuple(arr[266, 400]) == pytest.approx((40, 160, 60), abs=40)
    csv = corrections_csv(tmp_path / "c.csv", [(str(slide), "IHC")])
    assert cli.command(["review", str(folder), "--apply", str(csv), "--quiet"]) == 0
    copies = list((folder / "sorted" / "IHC").iterdir())
    assert len(copies) == 1 and copies[0].name.startswith("slide one__") and copies[0].suffix == ".png"
    with Image.open(copies[0]) as img:
        assert max(img.size) == 1024            # the run's thumbnail size (slide_thumbnail_size)
    assert not (tmp_path / "thumbclf-cache").exists()  # nothing written outside the folder


def dicom_with_label(folder: Path, tmp_path: Path) -> Path:
    """A DICOM WSI folder (wsidicomizer, from a generated pyramid) plus a LABEL instance named
    so that it is the folder's first .dcm in sort order."""
    import tifffile

    pydicom = pytest.importorskip("pydicom")
    wsidicomizer = pytest.importorskip("wsidicomizer")
    tiff = tmp_path / "src.tiff"
    img = np.full((800, 1200, 3), 240, np.uint8)
    img[200:600, 300:900] = (40, 160, 60)
    with tifffile.TiffWriter(tiff) as tw:
        for k in (1, 2, 4):
            tw.write(img[::k, ::k].copy(), tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(2e4 / k, 2e4 / k), resolutionunit="CENTIMETER",
                     subfiletype=0 if k == 1 else 1)
    folder.mkdir(parents=True)
    wsidicomizer.WsiDicomizer.convert(tiff, folder, tile_size=256, workers=1,
                                      include_label=False, include_overview=False)
    ds = pydicom.dcmread(min(folder.glob("*.dcm"), key=lambda p: p.stat().st_size))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]
    ds.PatientName, ds.SOPInstanceUID = "DOE^JANE", pydicom.uid.generate_uid()
    ds.save_as(folder / "0-label.dcm")
    return folder / "0-label.dcm"


def test_apply_copies_a_dicom_slide_as_the_deploy_does_never_its_label(tmp_path):
    """Issue 33, item 1: a table naming a DICOM slide by its first .dcm (a LABEL instance with
    the patient's name) made --apply with sortSlides copy that file, not the slide."""
    folder = results_folder(tmp_path, ["a", "b", "c"])
    label = dicom_with_label(tmp_path / "slides" / "slide1", tmp_path)
    table = pd.read_csv(folder / "predictions.csv", keep_default_na=False)
    table.loc[0, "PATH"] = str(label)
    table.to_csv(folder / "predictions.csv", index=False)
    (folder / "config.yaml").write_text("thumb_data: slides\nsort_thumbs: true\nsort_slides: true\n")
    csv = corrections_csv(tmp_path / "c.csv", [(str(label), "IHC")])
    assert cli.command(["review", str(folder), "--apply", str(csv), "--quiet"]) == 0
    copied = sorted(p.relative_to(folder / "sorted").as_posix()
                    for p in (folder / "sorted").rglob("*") if p.is_file())
    series = sorted(p.name for p in label.parent.glob("*.dcm") if p != label)
    assert [c.rsplit("/", 1)[-1] for c in copied if c.endswith(".dcm")] == series
    assert all(c.startswith("IHC/") for c in copied) and any(c.endswith(".png") for c in copied)
    secret = label.read_bytes()
    assert not any(p.read_bytes() == secret for p in (folder / "sorted").rglob("*.dcm"))
    from thumbclf.outputs import sorting  # the deploy's sorting: the same copy path

    jobs = sorting.plan_copies([(label, "IHC", tmp_path / "src.tiff")], tmp_path / "dep",
                               with_slides=True)
    sorting.copy_all(jobs)
    assert sorted(p.name for p in (tmp_path / "dep").rglob("*.dcm")) == series


def test_a_second_apply_leaves_no_stale_copy_in_another_class_folder(tmp_path, capsys):
    """Issue 33, item 6: moving reviewed_predictions.csv away (as the message says) and
    applying other corrections left each corrected slide in two class folders of sorted/."""
    folder = results_folder(tmp_path, ["a", "b", "c", "d"])
    paths = pd.read_csv(folder / "predictions.csv")["PATH"].tolist()
    decided = pd.read_csv(folder / "predictions.csv")["model_prediction"].tolist()
    one = [c for c in CLASSES if c != decided[3]]
    first = corrections_csv(tmp_path / "one.csv", [(paths[3], one[0]), (paths[0], "IHC")])
    assert cli.command(["review", str(folder), "--apply", str(first), "--quiet"]) == 0
    (folder / "reviewed_predictions.csv").rename(tmp_path / "old_reviewed.csv")
    (folder / "sorted" / "TMA").mkdir(parents=True, exist_ok=True)
    (folder / "sorted" / "TMA" / "mine.txt").write_text("not made by --apply")  # kept
    second = corrections_csv(tmp_path / "two.csv", [(paths[3], one[1])])
    assert cli.command(["review", str(folder), "--apply", str(second), "--quiet"]) == 0
    copies = sorted(p.relative_to(folder / "sorted").as_posix()
                    for p in (folder / "sorted").rglob("*.png"))
    assert [c.split("__")[0] for c in copies] == [f"{one[1]}/d"]
    assert (folder / "sorted" / "TMA" / "mine.txt").is_file()


def test_a_port_out_of_range_and_a_killed_copys_leftovers_are_handled(tmp_path, capsys):
    """Issue 33, item 20: --port 70000 gave exit 1 (a traceback); a killed --apply left hidden
    partial copies in sorted/."""
    folder = results_folder(tmp_path, ["a", "b", "c", "d"])
    assert cli.command(["review", str(folder), "--serve", "--port", "70000", "--quiet"]) == 2
    assert "choose another --port (1 to 65535)" in capsys.readouterr().err
    paths = pd.read_csv(folder / "predictions.csv")["PATH"].tolist()
    csv = corrections_csv(tmp_path / "c.csv", [(paths[0], "IHC")])
    jobs = review_flow.reviewed_copies(folder, review_flow.reviewed_table(
        *read_predictions(folder), read_corrections_of(csv)), review_flow.settings(folder))
    left = jobs[0][1].with_name(f".{jobs[0][1].name}.k1ll3d.tmp")
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half a copy")
    assert cli.command(["review", str(folder), "--apply", str(csv), "--quiet"]) == 0
    assert not left.exists() and jobs[0][1].is_file()


def read_predictions(folder: Path):
    from thumbclf.core import table as table_io

    return table_io.read(folder / "predictions.csv")


def read_corrections_of(csv: Path):
    from thumbclf.inputs.corrections import read_corrections

    return read_corrections([csv])


def test_review_and_apply_take_a_name_that_is_not_utf8(tmp_path):
    """Issue 33, item 16: review, --serve and --apply exited 1 on a folder holding a file name
    that is not UTF-8 (pandas' astype(str) refused its surrogate escapes)."""
    folder = results_folder(tmp_path, ["a", "cafX", "c", "d"])
    os.rename(tmp_path / "slides" / "cafX.png",
              os.fsdecode(os.fsencode(tmp_path / "slides") + b"/caf\xe9.png"))
    table = folder / "predictions.csv"
    table.write_bytes(table.read_bytes().replace(b"cafX", b"caf\xe9"))
    assert cli.command(["review", str(folder), "--quiet"]) == 0
    path = next(line for line in table.read_bytes().split(b"\n") if b"caf" in line).split(b",")[0]
    (tmp_path / "c.csv").write_bytes(b"PATH,CLASSIFICATION\n" + path + b",IHC\n")
    assert cli.command(["review", str(folder), "--apply", str(tmp_path / "c.csv"), "--quiet"]) == 0
    assert len(list((folder / "sorted" / "IHC").glob("caf*.png"))) == 1
