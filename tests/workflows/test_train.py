"""workflows/train.py: the training recipe's checks, refusals and what it writes."""

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY_TRAIN, messy_table, odd_names, run_script, write_yaml
from thumbclf.inputs import synth

FAST = TINY_TRAIN  # the one fast settings block (conftest)


def test_a_diverging_training_stops_without_a_model_file(tiny_data, tmp_path, monkeypatch, capsys):
    """Issue 24, item 7: a training that diverges writes no model file."""
    from thumbclf.cli import main
    from thumbclf.nn import training

    real = training.training_loss

    def exploding(output, y, criterion):
        logits, loss = real(output, y, criterion)
        return logits, loss * float("nan")

    monkeypatch.setattr(training, "training_loss", exploding)
    exp = tmp_path / "t.yaml"
    exp.write_text(f"thumbData: {tiny_data}\ntrainFull: true\npretrained: false\nmax_epochs: 1\n"
                   f"bootstrap: 0\ngradcam: 0\nnum_workers: 0\ncache_dir: {tmp_path / 'cache'}\n")
    assert main("train", [str(exp), "--quiet"]) == 2
    assert "training diverged: the training loss became nan; no model file was written" in capsys.readouterr().err
    assert not list((tmp_path / "t").rglob("*.pt"))


@pytest.mark.slow
def test_training_with_a_name_that_is_not_utf8(tmp_path):
    """Issue 24, item 8: names that are not text, names too long."""
    from thumbclf.cli import main
    from thumbclf.core import table

    data, odd = odd_names(tmp_path)
    exp = tmp_path / "t.yaml"
    exp.write_text(f"thumbData: {data}\ntrainFull: true\npretrained: false\nmax_epochs: 1\n"
                   "bootstrap: 0\ngradcam: 0\nnum_workers: 0\n")
    assert main("train", [str(exp), "--quiet"]) == 0
    assert odd in table.read_csv(tmp_path / "t" / "splits.csv")["PATH"].tolist()


def checksums(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_hostile_labels_write_only_inside_the_results_folder(tmp_path):
    """Issue 10, item 1: nothing lost."""
    data = tmp_path / "data"
    synth.generate(data, per_class=6, seed=4, sides=(60, 120), fmt="png",
                   classes=("IHC", "TMA", "Fat"))
    hostile = {"IHC": "../../../data/IHC", "TMA": "..", "Fat": "../../ESCAPED"}
    df = pd.read_csv(data / "labels.csv")
    df["CLASSIFICATION"] = df["CLASSIFICATION"].map(hostile)
    df.to_csv(data / "labels.csv", index=False)
    before = checksums(data)
    (tmp_path / "exp").mkdir()
    exp = write_yaml(tmp_path / "exp" / "run.yaml",
                     f"thumbData: {data / 'labels.csv'}\ntrainFull: true\n"
                     f"{FAST.replace('gradcam: 0', 'gradcam: 1')}"
                     f"\nprediction_threshold: 0.0\ncache_dir: {tmp_path / 'cache'}\n")
    r = run_script("train_thumbclassifier.py", str(exp))
    assert r.returncode == 0, r.stderr
    assert checksums(data) == before  # no input changed, none added
    results = tmp_path / "exp" / "run"
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not str(p).startswith(str(data))
               and p != exp]
    outside = [p for p in written if results not in p.parents and tmp_path / "cache" not in p.parents]
    assert outside == []
    assert not any("ESCAPED" in p.name for p in tmp_path.iterdir())
    assert len(list((results / "gradcam").rglob("*.png"))) >= 1


@pytest.mark.slow
def test_bad_or_unreachable_pretrained_weights_fail_before_anything_is_written(tiny_data, tmp_path):
    """Issue 10, item 7: nothing lost."""
    fast = FAST.replace("pretrained: false\n", "")
    exp = write_yaml(tmp_path / "e.yaml", f"thumbData: {tiny_data}\ntrainFull: true\n{fast}"
                     f"pretrained: {tmp_path / 'missing.pt'}\n")
    r = run_script("train_thumbclassifier.py", str(exp))
    assert r.returncode == 2 and "missing.pt: pretrained weights file not found" in r.stderr
    assert not (tmp_path / "e").exists()
    exp.write_text(f"thumbData: {tiny_data}\ntrainFull: true\n{fast}")  # default: ImageNet
    offline = {"TORCH_HOME": str(tmp_path / "torch"), "HTTPS_PROXY": "http://127.0.0.1:9",
               "https_proxy": "http://127.0.0.1:9"}
    r = run_script("train_thumbclassifier.py", str(exp), env_extra=offline)
    assert r.returncode == 2 and "cannot get the ImageNet weights" in r.stderr
    assert not (tmp_path / "e").exists()
    exp.write_text(f"thumbData: {tiny_data}\ntrainFull: true\n{FAST}")  # fixed: the same command
    r = run_script("train_thumbclassifier.py", str(exp))
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_training_leaves_out_unreadable_images_or_stops_when_too_many(tiny_data, tmp_path):
    """Issue 5, messy archives."""
    table = messy_table(tiny_data, tmp_path)
    exp = write_yaml(tmp_path / "t.yaml", f"thumbData: {table}\ntrainFull: true\n{FAST}")
    r = run_script("train_thumbclassifier.py", str(exp))
    assert r.returncode == 2 and "5 of 23 images (22%) cannot be read" in r.stderr
    assert "max_failed_fraction" in r.stderr and not (tmp_path / "t" / "model.pt").exists()
    r = run_script("train_thumbclassifier.py", str(exp), "--set", "max_failed_fraction=0.5",
                   "--output", str(tmp_path / "t2"))
    assert r.returncode == 0, r.stderr
    assert "5 of 23 images could not be read and are left out" in r.stderr
    val = pd.read_csv(tmp_path / "t2" / "full" / "val_predictions.csv")
    assert not val["PATH"].str.contains("/bad/").any()


def test_rare_classes_are_reported(caplog):
    """Issue 5, messy archives."""
    from thumbclf.workflows.train import report_rare_classes

    assert report_rare_classes({"A": 100, "B": 90, "C": 5}, "loss") == ["C"]
    assert "rare classes: C (5 images, 3%)" in caplog.text
    assert report_rare_classes({"A": 10, "B": 9}, "none") == []
