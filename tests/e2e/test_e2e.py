"""Both scripts run as a user would: subprocesses, experiment files, generated data."""

import json
import signal
import subprocess
import sys
import time
from collections import OrderedDict

import pandas as pd
import pytest
import torch

from conftest import ROOT, TINY_CLASSES, run_script, train_once, write_yaml
from thumbclf.nn.models import build_model

pytestmark = pytest.mark.slow
# a small backbone: the pipeline is tested, not ResNet-18 (conftest's TINY_TRAIN)
FAST = ("model_name: mobilenet_v3_small\npretrained: false\nbatch_size: 8\nmax_epochs: 2\nstopEpoch: 1\n"
        "patience: 1\nfreezeRatio: 0.5\nbootstrap: 50\nnum_workers: 0\nlr: 0.001\n")


@pytest.fixture(scope="module")
def cv_run(tiny_data, tmp_path_factory):
    return train_once(tmp_path_factory.mktemp("cv"), "cv",
                      f"thumbData: {tiny_data}\nfoldNumber: 2\n{FAST}")


def test_cross_validation_writes_the_documented_results(cv_run, tiny_data):
    out, _, _ = cv_run
    for name in ("config.yaml", "experiment.yaml", "run.log", "splits.csv", "predictions.csv",
                 "metrics.json", "metrics.csv", "confusion_matrix.csv",
                 "confusion_matrix_normalised.csv", "report.html", "fold_1/model.pt",
                 "fold_1/history.csv", "fold_1/predictions.csv", "fold_2/model.pt",
                 "plots/roc_curves.png", "plots/confusion_matrix.png", "plots/reliability.png",
                 "plots/accuracy_vs_threshold.png", "plots/training_curves.png"):
        assert (out / name).is_file(), name
    pred = pd.read_csv(out / "predictions.csv")
    labels = pd.read_csv(tiny_data)
    assert len(pred) == len(labels) and pred["PATH"].is_unique  # one OOF prediction per slide
    assert list(pred.columns[:4]) == ["PATH", "CLASSIFICATION", "PATIENT", "fold"]
    assert set(TINY_CLASSES) <= set(pred.columns)
    assert pred[list(TINY_CLASSES)].sum(axis=1).round(4).eq(1).all()
    assert set(pred["model_prediction"]) <= set(TINY_CLASSES) | {"Undecided"}
    hist = pd.read_csv(out / "fold_1" / "history.csv")
    assert list(hist["epoch"]) == [1, 2] and {"train_loss", "val_loss", "lr", "seconds"} <= set(hist.columns)
    m = json.loads((out / "metrics.json").read_text())
    assert {"all", "fold 1", "fold 2"} <= set(m) and m["all"]["n"] == len(labels)
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Confusion matrix" in html
    assert "Grad-CAM" in html and (out / "plots" / "gradcam.png").is_file()
    cams = list((out / "gradcam").rglob("*.png"))
    assert 0 < len(cams) <= 2 * (len(TINY_CLASSES) + 1)


def test_an_existing_results_folder_is_never_overwritten(cv_run):
    out, exp, _ = cv_run
    before = (out / "predictions.csv").read_bytes()
    r = run_script("train_thumbclassifier.py", str(exp))
    assert r.returncode == 2
    assert "results folder is not empty" in r.stderr and "--resume" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert (out / "predictions.csv").read_bytes() == before


def test_deploy_with_labels_an_ensemble_of_fold_models_and_sorting(cv_run, tiny_data, tmp_path):
    out, _, _ = cv_run
    exp = write_yaml(tmp_path / "dep.yaml", f"thumbData: {tiny_data}\nmodelAdr: {out}\n"
                     "sortThumbs: true\nbootstrap: 50\nprediction_threshold: 0.5\nnum_workers: 0\n"
                     "tta: true\n")
    before = {p: p.stat().st_mtime_ns for p in tiny_data.parent.rglob("*.jpg")}
    r = run_script("deploy_thumbclassifier.py", str(exp))
    assert r.returncode == 0, r.stderr
    res = tmp_path / "dep"
    pred = pd.read_csv(res / "predictions.csv", keep_default_na=False)
    assert len(pred) == 18 and (pred["error"] == "").all()
    assert "ensemble of 2 models" in (res / "run.log").read_text()
    sorted_files = list((res / "sorted").rglob("*.jpg"))
    assert len(sorted_files) == 18
    for _, row in pred.iterrows():
        from pathlib import Path
        assert (res / "sorted" / row["model_prediction"] / Path(row["PATH"]).name).is_file()
    after = {p: p.stat().st_mtime_ns for p in tiny_data.parent.rglob("*.jpg")}
    assert before == after  # sources untouched, copies only
    assert (res / "report.html").is_file() and (res / "metrics.json").is_file()


def test_deploy_without_labels_on_a_flat_folder(cv_run, tiny_data, tmp_path):
    out, _, _ = cv_run
    exp = write_yaml(tmp_path / "nolab.json", json.dumps(
        {"thumbData": str(tiny_data.parent), "modelAdr": str(out / "fold_1" / "model.pt"),
         "hasLabels": False, "num_workers": 0}))
    r = run_script("deploy_thumbclassifier.py", "--ExpFile", str(exp))
    assert r.returncode == 0, r.stderr
    pred = pd.read_csv(tmp_path / "nolab" / "predictions.csv")
    assert len(pred) == 18 and "CLASSIFICATION" not in pred.columns
    assert (tmp_path / "nolab" / "decisions.csv").is_file()
    assert (tmp_path / "nolab" / "report.html").is_file()


def test_full_training_writes_one_final_model(tiny_data, tmp_path):
    exp = write_yaml(tmp_path / "full.yaml", f"thumbData: {tiny_data}\ntrainFull: true\n{FAST}"
                     "target_accuracy: 0.9\n")
    r = run_script("train_thumbclassifier.py", str(exp), "--set", "max_epochs=1")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "full"
    assert (out / "model.pt").is_file() and not (out / "fold_1").exists()
    model = torch.load(out / "model.pt", weights_only=True)
    assert model["classes"] == list(TINY_CLASSES) and 0 <= model["threshold"] <= 1
    assert (out / "full" / "val_predictions.csv").is_file()


def test_prototype_state_dict_model_deploys_with_its_preprocessing(tiny_data, tmp_path):
    torch.manual_seed(0)
    m = build_model("resnet18", 3)
    torch.save(OrderedDict(m.state_dict()), tmp_path / "proto.pt")
    exp = tmp_path / "proto.txt"
    exp.write_text(json.dumps({"thumbData": str(tiny_data), "modelAdr": "proto.pt",
                               "target_labels": ["TMA", "Biopsy", "IHC"], "model_name": "resnet18",
                               "hasLabels": True, "bootstrap": 0, "num_workers": 0}))
    r = run_script("deploy_thumbclassifier.py", str(exp))
    assert r.returncode == 0, r.stderr
    pred = pd.read_csv(tmp_path / "proto" / "predictions.csv")
    cols = list(pred.columns)
    assert cols.index("Biopsy") < cols.index("IHC") < cols.index("TMA")  # alphabetical outputs
    # probabilities equal the prototype's recipe computed by hand for the first image
    from PIL import Image
    import numpy as np
    img = Image.open(pred["PATH"][0]).convert("RGB")
    side = max(img.size)
    canvas = Image.new("RGB", (side, side))
    canvas.paste(img, (int((side - img.size[0]) / 2), int((side - img.size[1]) / 2)))
    x = torch.from_numpy(np.array(canvas.resize((224, 224), Image.Resampling.BICUBIC))).permute(2, 0, 1)
    with torch.no_grad():
        p = torch.softmax(m.eval()(x.float().div(255).unsqueeze(0)), 1)[0].numpy()
    assert np.allclose(pred.loc[0, ["Biopsy", "IHC", "TMA"]].to_numpy(float), p, atol=1e-4)


def test_config_errors_are_one_line_each_and_exit_2(tmp_path):
    exp = write_yaml(tmp_path / "bad.yaml", "thumbData: nowhere\nfreezeRatio: 2\n")
    r = run_script("train_thumbclassifier.py", str(exp))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {exp}: freezeRatio must be between 0 and 1; got 2"]
    r = run_script("train_thumbclassifier.py", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "experiment file not found" in r.stderr


def test_interrupted_cross_validation_resumes_to_the_same_result(cv_run, tmp_path):
    """Kill a real run in the middle of fold 1 (during its last epoch); --resume continues from
    the last epoch. The reference is the module's uninterrupted run of the same experiment
    (issue 32: one training fewer); Grad-CAM, which comes after the predictions, is left out.
    Also what a second run of the same experiment must give: the same splits and predictions
    (fold 2 is trained afresh here; this was a test of its own, one more training)."""
    ref, exp, _ = cv_run
    out = tmp_path / "cv"
    args = [str(exp), "--output", str(out), "--set", "gradcam=0"]
    import os
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_thumbclassifier.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while not (out / "fold_1" / "checkpoint.pt").is_file() and time.time() < deadline:
        time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in err, err
    assert not (out / "predictions.csv").exists() and not (out / "fold_1" / "predictions.csv").exists()
    r = run_script("train_thumbclassifier.py", *args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "fold 1: continuing after epoch" in (out / "run.log").read_text()
    assert not (out / "fold_1" / "checkpoint.pt").exists()
    pd.testing.assert_frame_equal(pd.read_csv(out / "predictions.csv"),
                                  pd.read_csv(ref / "predictions.csv"))
    assert (out / "splits.csv").read_text() == (ref / "splits.csv").read_text()
    pd.testing.assert_frame_equal(pd.read_csv(out / "fold_2" / "predictions.csv"),
                                  pd.read_csv(ref / "fold_2" / "predictions.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(out / "fold_1" / "history.csv").drop(
        columns=["seconds", "train_images_per_s"]), pd.read_csv(
        ref / "fold_1" / "history.csv").drop(columns=["seconds", "train_images_per_s"]))
    r = run_script("train_thumbclassifier.py", *args, "--resume")  # all done: only re-evaluates
    assert r.returncode == 0 and "fold_2: finished earlier; skipped" in (out / "run.log").read_text()
