"""Messy archives: bad files, interruptions and unwritable outputs (issue: keep working, lose nothing)."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import ROOT, TINY_TRAIN, run_script, write_yaml
from thumbclf.inputs import synth
from thumbclf.core.errors import OutputError
from thumbclf.core.files import atomic_text
from thumbclf.workflows.run import prepare_output

FAST = TINY_TRAIN  # the one fast settings block (conftest)


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model  # the session's tiny model (conftest)


def messy_table(tiny_data, tmp_path):
    """The tiny table plus a corrupt, a truncated, an empty, a fake and a missing image."""
    shutil.copytree(tiny_data.parent, tmp_path / "data")
    bad = tmp_path / "data" / "bad"
    bad.mkdir()
    good = next((tmp_path / "data" / "TMA").glob("*.jpg")).read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (bad / "empty.png").write_bytes(b"")
    (bad / "fake.jpg").write_text("not an image")
    (bad / "garbage.png").write_bytes(os.urandom(500))
    df = pd.read_csv(tmp_path / "data" / "labels.csv")
    extra = pd.DataFrame({"PATH": ["bad/truncated.jpg", "bad/empty.png", "bad/fake.jpg",
                                   "bad/garbage.png", "bad/missing.jpg"],
                          "CLASSIFICATION": ["TMA", "IHC", "Biopsy", "TMA", "IHC"],
                          "PATIENT": ["X1", "X2", "X3", "X4", "X5"]})
    pd.concat([df, extra]).to_csv(tmp_path / "data" / "labels.csv", index=False)
    return tmp_path / "data" / "labels.csv"


@pytest.mark.slow
def test_deploy_keeps_unreadable_rows_with_the_reason_and_finishes(model_dir, tiny_data, tmp_path):
    table = messy_table(tiny_data, tmp_path)
    exp = write_yaml(tmp_path / "dep.yaml", f"thumbData: {table}\nmodelAdr: {model_dir}\n"
                     "bootstrap: 0\nnum_workers: 1\nsortThumbs: true\n")
    r = run_script("deploy_thumbclassifier.py", str(exp))
    assert r.returncode == 0, r.stderr
    pred = pd.read_csv(tmp_path / "dep" / "predictions.csv", keep_default_na=False)
    assert len(pred) == 23
    bad = pred[pred["error"] != ""]
    assert len(bad) == 5 and (bad["model_prediction"] == "").all()
    reasons = dict(zip(bad["PATH"].str.rsplit("/", n=1).str[-1], bad["error"]))
    assert "truncated" in reasons["truncated.jpg"] and "empty file" in reasons["empty.png"]
    assert "not an image" in reasons["fake.jpg"] and "file not found" in reasons["missing.jpg"]
    assert list(bad["row"]) == [20, 21, 22, 23, 24]  # table row numbers
    assert "5 unreadable" in r.stderr
    assert len(list((tmp_path / "dep" / "sorted").rglob("*.jpg"))) == 18


@pytest.mark.slow
def test_training_leaves_out_unreadable_images_or_stops_when_too_many(tiny_data, tmp_path):
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


@pytest.mark.slow
def test_interrupted_deploy_resumes_with_only_the_rest(model_dir, tmp_path):
    synth.generate(tmp_path / "many", per_class=60, seed=9, sides=(60, 120),
                   classes=("IHC", "TMA"))
    exp = write_yaml(tmp_path / "d.yaml", f"thumbData: {tmp_path / 'many'}\nmodelAdr: {model_dir}\n"
                     "hasLabels: false\nbatch_size: 1\nnum_workers: 0\n")
    partial = tmp_path / "d" / "predictions.partial.csv"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # Ctrl-C as a terminal sends it: a suite started in the background (nohup, `&`) ignores
    # SIGINT, and its children would inherit that and run to the end
    proc = subprocess.Popen([sys.executable, str(ROOT / "deploy_thumbclassifier.py"), str(exp)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline:
        if partial.is_file() and len(partial.read_text().splitlines()) > 5:
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume" in err
    done = len(pd.read_csv(partial))
    assert 4 < done < 120
    r = run_script("deploy_thumbclassifier.py", str(exp), "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resuming: {done} images predicted earlier, {120 - done} to go" in r.stderr
    pred = pd.read_csv(tmp_path / "d" / "predictions.csv")
    assert len(pred) == 120 and pred["PATH"].is_unique and not partial.exists()
    r = run_script("deploy_thumbclassifier.py", str(exp), "--resume")
    assert r.returncode == 2 and "finished already" in r.stderr


def test_results_folder_that_cannot_be_created_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        prepare_output(tmp_path / "file", resume=False)
    with pytest.raises(OutputError, match="cannot write the results folder"):
        prepare_output(tmp_path / "file" / "sub", resume=False)
    with pytest.raises(OutputError, match="nothing to resume"):
        prepare_output(tmp_path / "new", resume=True)


def test_a_full_disk_is_a_clear_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.csv"
    target.write_text("old complete content")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match="No space left on device.*disk full"):
        atomic_text("new", target)
    assert target.read_text() == "old complete content"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


@pytest.mark.slow
def test_unwritable_output_via_the_script_is_one_line(tmp_path, tiny_data):
    (tmp_path / "blocker").write_text("x")
    exp = write_yaml(tmp_path / "e.yaml", f"thumbData: {tiny_data}\n")
    r = run_script("train_thumbclassifier.py", str(exp), "--output", str(tmp_path / "blocker" / "x"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "cannot write the results folder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path):
    exp = write_yaml(tmp_path / "e.yaml", "thumbData: nowhere\n")
    r = run_script("train_thumbclassifier.py", str(exp), "--debug")
    assert r.returncode == 2 and "Traceback" in r.stderr and "thumbData not found" in r.stderr


def test_rare_classes_are_reported(caplog):
    from thumbclf.workflows.train import report_rare_classes

    assert report_rare_classes({"A": 100, "B": 90, "C": 5}, "loss") == ["C"]
    assert "rare classes: C (5 images, 3%)" in caplog.text
    assert report_rare_classes({"A": 10, "B": 9}, "none") == []


@pytest.mark.slow
def test_a_run_that_failed_before_any_result_can_simply_be_run_again(tmp_path, tiny_data):
    exp = write_yaml(tmp_path / "e.yaml", f"thumbData: {tiny_data}\n{FAST}foldNumber: 10\n")
    r = run_script("train_thumbclassifier.py", str(exp))
    assert r.returncode == 2 and "fewer than the 10 needed" in r.stderr
    assert (tmp_path / "e" / "run.log").is_file()
    exp.write_text(exp.read_text().replace("foldNumber: 10", "foldNumber: 2"))
    r = run_script("train_thumbclassifier.py", str(exp))
    assert r.returncode == 0, r.stderr
    assert "fewer than the 10 needed" in (tmp_path / "e" / "run.log").read_text()  # log kept
