"""The Python API: the same work, the same results and the same errors as the command line."""

import os
import subprocess
import tempfile
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import thumbclf
from conftest import ROOT, TINY_CLASSES, model_file, run_command, write_yaml
from thumbclf.api import load_experiment

# a small backbone: the pipeline is tested, not ResNet-18 (conftest's TINY_TRAIN)
FAST = {"model_name": "mobilenet_v3_small", "pretrained": False, "batch_size": 8, "max_epochs": 1,
        "stopEpoch": 1, "patience": 1, "foldNumber": 2, "gradcam": 0, "bootstrap": 0,
        "num_workers": 0, "lr": 0.001}


def thumbclf_cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    """``thumbclf ARGS`` as a user would type it: the command-line function in this process
    (issue 32: no fresh interpreter; tests/test_cli.py runs ``python -m thumbclf`` itself)."""
    return run_command(*args, cwd=cwd)


def error_lines(stderr: str) -> str:
    """The command line's error lines without their 'error: ' prefix, as one message."""
    lines = stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), stderr
    return "\n".join(line.removeprefix("error: ") for line in lines)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A cross-validation trained through the API from a dict; relative paths from the cwd."""
    work = tmp_path_factory.mktemp("api")
    old = os.getcwd()
    os.chdir(tiny_data.parent)
    try:
        folder = thumbclf.train({"thumbData": tiny_data.name, **FAST}, output=work / "cv",
                                quiet=True)
    finally:
        os.chdir(old)
    return folder


@pytest.mark.slow
def test_train_from_a_dict_returns_the_results_folder(trained):
    assert trained.is_dir() and (trained / "fold_2" / "model.pt").is_file()
    assert (trained / "predictions.csv").is_file() and (trained / "report.html").is_file()
    copy = (trained / "experiment.yaml").read_text()
    assert "as a dict" in copy and "thumbData: labels.csv" in copy  # the dict, as given
    import logging
    assert not any(getattr(h, "_thumbclf", False) for h in logging.getLogger().handlers)


@pytest.mark.slow
def test_predict_gives_the_command_lines_predictions(trained, tiny_data, tmp_path):
    exp = write_yaml(tmp_path / "dep.yaml", f"thumbData: {tiny_data}\nmodelAdr: {trained}\n"
                     "gradcam: 0\nbootstrap: 0\nnum_workers: 0\n")
    r = thumbclf_cli("deploy", exp, "--quiet")
    assert r.returncode == 0, r.stderr
    cli = pd.read_csv(tmp_path / "dep" / "predictions.csv", keep_default_na=False)
    classes = list(TINY_CLASSES)

    model = thumbclf.load_model(trained)
    assert model.classes == TINY_CLASSES
    api = model.predict(tiny_data)  # the same table file
    assert list(api.columns) == list(cli.columns)
    pd.testing.assert_frame_equal(api, cli, check_dtype=False)
    assert np.array_equal(api[classes].to_numpy(), cli[classes].to_numpy())  # identical

    table = pd.read_csv(tiny_data)  # a DataFrame: relative paths start at the cwd
    table["PATH"] = [str(tiny_data.parent / p) for p in table["PATH"]]
    pd.testing.assert_frame_equal(model.predict(table), cli, check_dtype=False)

    paths = model.predict(list(cli["PATH"]))  # a list of paths: no labels, no row numbers
    assert list(paths.columns) == ["PATH", *classes, "model_prediction", "undecided_reason",
                                   "tissue_fraction", "error", "error_kind",  # issues 28, 32
                                   "threshold"]
    assert np.array_equal(paths[classes].to_numpy(), cli[classes].to_numpy())
    assert list(paths["model_prediction"]) == list(cli["model_prediction"])

    pictures = [Image.open(p) for p in cli["PATH"][:5]]  # PIL images, preprocessed as files are
    from thumbclf.inputs.decode import load_array, picture_array

    prep = model.models[0].prep
    assert all(np.array_equal(picture_array(Image.open(p), prep), load_array(Path(p), prep))
               for p in cli["PATH"][:5])  # the same pixels
    pics = model.predict(pictures)
    # computed in a batch of 5, not of 18: PyTorch fp32 on the CPU (too few images for the
    # quality gate to verify bf16) rounds a batch's convolutions differently, by ~1e-7
    assert np.allclose(pics[classes].to_numpy(), cli[classes].to_numpy()[:5], rtol=0, atol=1e-5)
    assert list(pics["model_prediction"]) == list(cli["model_prediction"][:5])
    assert list(pics["PATH"]) == list(cli["PATH"][:5])


@pytest.mark.slow
def test_deploy_from_a_file_with_settings(trained, tiny_data, tmp_path):
    exp = write_yaml(tmp_path / "d.yaml", "thumbData: data/labels.csv\nhasLabels: false\n")
    (tmp_path / "data").symlink_to(tiny_data.parent)
    folder = thumbclf.deploy(exp, modelAdr=trained / "fold_1" / "model.pt", num_workers=0,
                             gradcam=0, quiet=True)
    assert folder == tmp_path / "d"  # the default: named after the file, beside it
    pred = pd.read_csv(folder / "predictions.csv")
    assert len(pred) == 18 and "CLASSIFICATION" not in pred.columns


@pytest.mark.slow
def test_api_errors_are_the_command_lines_messages(trained, tmp_path):
    bad = write_yaml(tmp_path / "bad.yaml", "thumbData: nowhere\nfreezeRatio: 2\nfreezeRatoi: 1\n")
    r = thumbclf_cli("train", bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    with pytest.raises(thumbclf.ConfigError) as err:
        thumbclf.train(bad)
    assert str(err.value) == error_lines(r.stderr)
    assert len(str(err.value).splitlines()) == 2

    done = write_yaml(tmp_path / "again.yaml", f"thumbData: {trained.parent}\n")
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "predictions.csv").write_text("x")
    r = thumbclf_cli("train", done)
    assert r.returncode == 2
    with pytest.raises(thumbclf.OutputError) as err:
        thumbclf.train(done)
    # the same message, in the API's words for the command line's flags (issue 31)
    assert str(err.value) == error_lines(r.stderr).replace(
        "Use --resume to continue it", "Use resume=True to continue it").replace(
        "--output NEW_FOLDER", "output='NEW_FOLDER'")

    with pytest.raises(thumbclf.ModelError, match="model file not found"):
        thumbclf.load_model(tmp_path / "missing.pt")
    with pytest.raises(thumbclf.ConfigError, match=r"load_model\(\): batch_size must be an integer"):
        thumbclf.load_model(trained, batch_size="many")


def test_a_dict_is_validated_like_a_file_and_needs_an_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(thumbclf.ConfigError, match="output is required when the experiment is a dict"):
        thumbclf.train({"thumbData": "data"})
    with pytest.raises(thumbclf.ConfigError) as err:
        thumbclf.train({"thumbData": "data", "freezeRatoi": 1}, output="runs/x")
    assert str(err.value) == ("<experiment dict>: freezeRatoi: unknown key; did you mean "
                              "'freezeRatio'?")
    assert not (tmp_path / "runs").exists()  # nothing written before the experiment is valid
    params, raw = load_experiment({"thumbData": tmp_path.joinpath("t.csv").relative_to(tmp_path),
                                   "cm_sortlabels": ("A", "B")}, workflow="train",
                                  output="runs/x", settings={"fold_number": 4})
    assert params.thumb_data == tmp_path / "t.csv"  # relative to the current directory
    assert params.output == tmp_path / "runs" / "x" and params.fold_number == 4
    assert raw["cm_sortlabels"] == ["A", "B"]  # Python values as a file would hold them


def test_settings_override_any_spelling_like_set(tmp_path):
    exp = write_yaml(tmp_path / "e.yaml", "thumbData: d\nfoldNumber: 5\n")
    params, raw = load_experiment(exp, workflow="train", settings={"fold_number": 2})
    assert params.fold_number == 2 and raw is None
    assert params.thumb_data == tmp_path / "d" and params.output == tmp_path / "e"


def test_import_is_light_and_the_api_names_stay_functions():
    code = ("import sys, thumbclf; assert 'torch' not in sys.modules and 'pandas' not in "
            "sys.modules; import thumbclf.workflows.train, thumbclf.workflows.deploy; "
            "assert callable(thumbclf.train) and thumbclf.train.__module__ == 'thumbclf.api'; "
            "assert thumbclf.deploy.__module__ == 'thumbclf.api'; print(thumbclf.__version__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == thumbclf.__version__


def test_api_errors_name_the_apis_own_arguments(tiny_data, tmp_path):
    """Issue 31: a notebook user is told resume=True and output=..., not --resume and --output."""
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("x")
    with pytest.raises(thumbclf.OutputError) as err:
        thumbclf.train({"thumbData": str(tiny_data), **FAST}, output=busy, quiet=True)
    text = str(err.value)
    assert "resume=True" in text and "output='NEW_FOLDER'" in text and "--" not in text


def test_pretrain_and_evaluate_are_in_the_api(tiny_model, tmp_path):
    """Issue 31: every command has its function: pretrain() and evaluate()."""
    from thumbclf import api

    with pytest.raises(thumbclf.ConfigError, match="momentum must be between"):
        thumbclf.pretrain({"thumbData": str(tmp_path), "momentum": 2}, output=tmp_path / "p")
    from thumbclf.core import layout

    table = layout.fold_predictions(tiny_model, 0)
    folder = api.evaluate(table, output=tmp_path / "ev", bootstrap=0)
    assert (folder / "report.html").is_file() and (folder / "metrics.json").is_file()
    with pytest.raises(thumbclf.OutputError) as err:
        api.evaluate(table, output=tmp_path / "ev", bootstrap=0)
    assert "output='NEW_FOLDER'" in str(err.value) and "threshold=T" in str(err.value)


def test_review_and_apply_corrections_name_a_wrong_argument(tmp_path):
    """Issue 33, item 20: api.review(None) and apply_corrections(X, DataFrame) raised raw
    TypeErrors."""
    import pandas as pd
    import pytest

    from thumbclf import api
    from thumbclf.core.errors import ConfigError

    with pytest.raises(ConfigError, match="review: results must be the path of a results folder; "
                                          "got NoneType"):
        api.review(None)
    frame = pd.DataFrame({"PATH": ["a.png"], "CLASSIFICATION": ["IHC"]})
    with pytest.raises(ConfigError, match="corrections must be the path .* got DataFrame"):
        api.apply_corrections(tmp_path, frame)


def test_predict_writes_no_folder(tiny_model, tiny_data, tmp_path, monkeypatch):
    """Issue 32: the API predicts without a results folder: predict() makes no folder (the
    thumbclf-predict- temporary folder it once used included) and writes nothing under the
    temporary folder or the current one."""
    work, tmp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    model = thumbclf.load_model(tiny_model, num_workers=0, cache_dir=tmp_path / "cache")
    made = []
    real = os.mkdir
    monkeypatch.setattr(os, "mkdir",
                        lambda path, *a, **k: (made.append(path), real(path, *a, **k)))
    table = model.predict(tiny_data)
    pictures = model.predict([Image.open(p) for p in table["PATH"][:3]])
    assert len(table) == 18 and len(pictures) == 3
    assert made == []
    assert list(work.iterdir()) == [] and list(tmp.iterdir()) == []
def test_the_api_takes_numpy_numbers_and_gives_an_empty_picture_an_error_row(tiny_data, tmp_path):
    """Issue 24, hostile inputs."""
    from PIL import Image

    import thumbclf
    from thumbclf.config import TRAIN
    from thumbclf.config.files import load_experiment

    params, _ = load_experiment({"thumbData": str(tiny_data), "max_epochs": np.int64(2),
                                 "lr": np.float32(0.01), "augment": np.bool_(False)},
                                workflow=TRAIN, output=tmp_path / "o")
    assert params.max_epochs == 2 and params.augment is False
    model = thumbclf.load_model(model_file(tmp_path / "model.pt"))
    table = model.predict([Image.new("RGB", (0, 0)), Image.new("RGB", (50, 40), "white"),
                           tmp_path / "gone.png"])
    assert table["error"].tolist()[:2] == ["a picture of 0 x 0 pixels: nothing to classify", ""]
    assert table["model_prediction"].iloc[1] != ""
    assert table["error_kind"].tolist() == ["unreadable", "", "not found"]  # issue 32


@pytest.mark.isolated
def test_load_model_caches_beside_the_model_not_above_the_current_folder(tmp_path, monkeypatch):
    """Issue 24, hostile inputs."""
    pytest.importorskip("openvino", reason="OpenVINO is the optional extra thumbclf[openvino]")
    import thumbclf

    (tmp_path / "models").mkdir()
    model = model_file(tmp_path / "models" / "model.pt")
    work = tmp_path / "notebooks" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    thumbclf.load_model(model, engine="openvino", precision="fp32")
    assert list((tmp_path / "models" / "thumbclf-cache" / "engines").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "notebooks"]
    assert not list((tmp_path / "notebooks").rglob("thumbclf-cache"))
