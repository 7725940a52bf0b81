"""The training key `corrections`: reviewed labels override thumbData's and add slides; a
missing file or two corrections that disagree stop with one line naming the rows (exit 2)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import write_yaml
from thumbclf import cli
from thumbclf.core.errors import DataError
from thumbclf.inputs.corrections import apply_corrections, read_corrections
from thumbclf.inputs import synth
from thumbclf.inputs.samples import discover

# a small backbone: the pipeline is tested, not ResNet-18 (conftest's TINY_TRAIN)
FAST = ("model_name: mobilenet_v3_small\npretrained: false\nbatch_size: 8\nmax_epochs: 1\nstopEpoch: 1\n"
        "patience: 1\nfoldNumber: 2\nbootstrap: 0\nnum_workers: 0\nlr: 0.001\n")


def table(path: Path, rows, columns=("PATH", "CLASSIFICATION")) -> Path:
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


def slides_of(labels: Path) -> pd.DataFrame:
    df = pd.read_csv(labels, dtype=str)
    df["PATH"] = [str(labels.parent / p) for p in df["PATH"]]
    return df


def extra_images(tiny_data: Path, folder: Path, n: int = 2) -> list[Path]:
    """Slides that are not in thumbData: copies of TMA pictures under new names."""
    folder.mkdir()
    sources = sorted((tiny_data.parent / "TMA").iterdir())[:n]
    return [Path(shutil.copy(s, folder / f"new_{i}{s.suffix}")) for i, s in enumerate(sources)]


def test_corrections_override_add_and_undecided_changes_nothing(tmp_path):
    labels = synth.generate(tmp_path / "data", per_class=3, seed=5, sides=(40, 60),
                            classes=("Biopsy", "IHC", "TMA"), patients=2)
    slides = slides_of(labels)
    biopsy = slides[slides["CLASSIFICATION"] == "Biopsy"]["PATH"].tolist()
    new = extra_images(labels, tmp_path / "extra")
    corr = table(tmp_path / "data" / "c.csv", [
        (biopsy[0], "IHC"),                                        # changed
        (str(Path(biopsy[1]).relative_to(labels.parent)), "Biopsy"),  # relative: same label
        (biopsy[2], "Undecided"),                                  # looked at, left Undecided
        (str(new[0]), "TMA"), (str(new[1]), "TMA")])               # added
    base = discover(labels, need_labels=True)
    out, applied = apply_corrections(base, read_corrections([corr]))
    assert (applied.changed, applied.added, applied.confirmed, applied.left_undecided) == (1, 2, 1, 1)
    assert "1 labels changed, 2 slides added" in applied.sentence()
    got = {str(s.path.resolve()): s for s in out.samples}
    assert got[str(Path(biopsy[0]).resolve())].label == "IHC"
    assert got[str(Path(biopsy[2]).resolve())].label == "Biopsy"
    assert got[str(new[0].resolve())].label == "TMA" and len(out) == len(base) + 2
    patient = slides.set_index("PATH").loc[biopsy[0], "PATIENT"]
    assert got[str(Path(biopsy[0]).resolve())].patient == patient  # patients as the inputs say
    with pytest.raises(DataError, match=r"not in target_labels.*c\.csv row 5"):
        apply_corrections(base, read_corrections([corr]), target_labels=("Biopsy", "IHC"))


def train_expecting_error(exp: Path, capsys) -> str:
    capsys.readouterr()
    assert cli.command(["train", str(exp), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_a_missing_file_stops_training_naming_the_row(tiny_data, tmp_path, capsys):
    slides = slides_of(tiny_data)
    table(tmp_path / "fixes.csv", [(slides["PATH"][0], "IHC"),
                                          (str(tmp_path / "gone.png"), "TMA")])
    exp = write_yaml(tmp_path / "exp.yaml", f"thumbData: {tiny_data}\ncorrections: fixes.csv\n{FAST}")
    err = train_expecting_error(exp, capsys)
    assert re.search(r"fixes\.csv row 3 \(.*gone\.png\)", err) and "not found" in err
    assert not list((tmp_path / "exp").rglob("model.pt"))


def test_disagreeing_corrections_stop_training_naming_both_rows(tiny_data, tmp_path, capsys):
    first = slides_of(tiny_data)["PATH"][0]
    table(tmp_path / "a.csv", [(first, "IHC")])
    table(tmp_path / "b.csv", [(slides_of(tiny_data)["PATH"][1], "TMA"), (first, "TMA")])
    exp = write_yaml(tmp_path / "exp.yaml",
                     f"thumbData: {tiny_data}\ncorrections: [a.csv, b.csv]\n{FAST}")
    err = train_expecting_error(exp, capsys)
    assert "a.csv row 2 says 'IHC' vs" in err and "b.csv row 3 says 'TMA'" in err
    assert not list((tmp_path / "exp").rglob("model.pt"))


@pytest.mark.slow
def test_corrected_labels_reach_the_training_table_log_report_and_review_page(tiny_data, tmp_path):
    slides = slides_of(tiny_data)
    biopsy = slides[slides["CLASSIFICATION"] == "Biopsy"]["PATH"].tolist()
    new = extra_images(tiny_data, tmp_path / "extra")
    corr = table(tmp_path / "corrections.csv",
                 [(biopsy[0], "IHC"), (biopsy[1], "TMA"), (biopsy[2], "Undecided"),
                  (str(new[0]), "TMA", "P_new"), (str(new[1]), "TMA", "P_new")],
                 columns=("PATH", "CLASSIFICATION", "PATIENT"))
    exp = write_yaml(tmp_path / "next.yaml", f"thumbData: {tiny_data}\ncorrections: "
                     f"{corr.name}\ngradcam: 1\n{FAST}")
    assert cli.command(["train", str(exp), "--quiet"]) == 0
    out = tmp_path / "next"
    pred = pd.read_csv(out / "predictions.csv", dtype=str)
    got = dict(zip(pred["PATH"].map(lambda p: str(Path(p).resolve())), pred["CLASSIFICATION"]))
    assert len(pred) == len(slides) + 2
    assert got[str(Path(biopsy[0]).resolve())] == "IHC" and got[str(Path(biopsy[1]).resolve())] == "TMA"
    assert got[str(Path(biopsy[2]).resolve())] == "Biopsy"
    assert got[str(new[0].resolve())] == "TMA" and got[str(new[1].resolve())] == "TMA"
    patients = dict(zip(pred["PATH"].map(lambda p: str(Path(p).resolve())), pred["PATIENT"]))
    assert patients[str(new[0].resolve())] == "P_new" == patients[str(new[1].resolve())]
    folds = dict(zip(pred["PATH"].map(lambda p: str(Path(p).resolve())), pred["fold"]))
    assert folds[str(new[0].resolve())] == folds[str(new[1].resolve())]  # one patient, one fold
    sentence = "2 labels changed, 2 slides added, 0 labels confirmed, 1 left Undecided"
    assert sentence in (out / "run.log").read_text()
    assert sentence in (out / "report.html").read_text()

    # the next round: review that training run, with its Grad-CAM overlays
    assert cli.command(["review", str(out), "--quiet"]) == 0
    html = (out / "review" / "index.html").read_text()
    data = json.loads(re.search(r'<script id="thumbclf-data" type="application/json">(.*?)</script>',
                                html, re.S).group(1))
    overlays = pd.read_csv(out / "gradcam" / "index.csv")
    with_cam = [r for r in data["items"] if r["g"]]
    assert len(with_cam) == len(overlays) > 0
    assert all((out / "review" / r["g"]).is_file() for r in with_cam)
    assert data["classes"] == ["Biopsy", "IHC", "TMA"]


def test_a_name_over_255_bytes_is_a_missing_row_not_a_crash(tmp_path):
    """Issue 33, item 17: a corrections row whose name is over 255 bytes gave exit 1 (an
    OSError) from --apply and from training."""
    long = tmp_path / ("é" * 200 + ".png")  # 400 bytes in one part
    table = tmp_path / "c.csv"
    pd.DataFrame({"PATH": [str(long)], "CLASSIFICATION": ["IHC"]}).to_csv(table, index=False)
    with pytest.raises(DataError, match=r"c\.csv row 2 .*over 255 bytes cannot exist.*fix the "
                                        r"PATH or delete the row"):
        read_corrections([table])


def test_a_class_only_the_corrections_bring_names_their_rows_not_the_training_table(tmp_path):
    """Issue 33, item 20: a corrections row adding a new class blamed the training table."""
    labels = synth.generate(tmp_path / "data", per_class=3, seed=5, sides=(40, 60),
                            classes=("Biopsy", "IHC"))
    biopsy = slides_of(labels).query("CLASSIFICATION == 'Biopsy'")["PATH"].tolist()
    corr = table(tmp_path / "c.csv", [(biopsy[0], "Fat")])
    base = discover(labels, need_labels=True)
    with pytest.raises(DataError, match=r"corrections: .*c\.csv row 2 .* adds the class 'Fat', "
                                        r"which .*labels\.csv does not have, with 1 image"):
        apply_corrections(base, read_corrections([corr]), min_images=2)
    out, _ = apply_corrections(base, read_corrections([corr]))  # enough for what is asked: kept
    assert "Fat" in out.classes
