"""Self-supervised pretraining: the workflow, its checkpoint, resume, and training from it."""

import logging

import pandas as pd
import pytest
import torch

from conftest import TINY_CLASSES, run_script, write_yaml
from thumbclf.inputs import synth
from thumbclf.workflows import pretrain
from thumbclf.config import PRETRAIN, TRAIN, PretrainParams, load_params
from thumbclf.core.errors import ConfigError, ModelError
from thumbclf.nn.models import SSL_CHECKPOINT, build_model, head_names, load_ssl

SMALL = 64  # input size of the in-process runs (the workflow's own size is the backbone's)


def backbone_keys(model):
    heads = tuple(h + "." for h in head_names(model))
    return [k for k in model.state_dict() if not k.startswith(heads)]


def pretrain_in_process(tmp_path, data, name="pre", resume=False, **keys):
    keys = {"batch_size": 4, "max_epochs": 2, "num_workers": 0, **keys}
    text = f"thumbData: {data}\n" + "".join(f"{k}: {v}\n" for k, v in keys.items())
    exp = write_yaml(tmp_path / f"{name}.yaml", text)
    params = load_params(exp, workflow=PRETRAIN)
    params.output.mkdir(exist_ok=True)
    return pretrain.run(params, resume=resume, progress=False, input_size=SMALL)


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    """9 small unlabelled thumbnails in a flat folder search (the table's labels are unused)."""
    out = tmp_path_factory.mktemp("unlabelled")
    synth.generate(out, per_class=3, seed=4, sides=(48, 96), classes=TINY_CLASSES)
    return out


def test_pretrain_keys_defaults_and_shared_files(tmp_path):
    exp = write_yaml(tmp_path / "e.yaml", "thumbData: d\nfoldNumber: 4\nmomentum: 0.9\n")
    p = load_params(exp, workflow=PRETRAIN)
    assert isinstance(p, PretrainParams)
    assert (p.lr, p.wd, p.max_epochs, p.pretrained, p.ssl_method, p.projection_dim,
            p.momentum) == (1e-3, 1e-6, 100, False, "byol", 256, 0.9)
    assert load_params(exp, workflow=TRAIN).fold_number == 4  # one file serves both
    bad = write_yaml(tmp_path / "b.yaml", "thumbData: d\nmomentum: 1.5\nssl_method: simclr\n")
    with pytest.raises(ConfigError) as err:
        load_params(bad, workflow=PRETRAIN)
    assert str(err.value).splitlines() == [
        f"{bad}: momentum must be between 0 and 0.99999; got 1.5",
        f"{bad}: ssl_method must be one of byol; got 'simclr'"]


def test_tiny_pretraining_writes_a_checkpoint_that_loads_every_backbone_weight(
        tmp_path, unlabelled):
    out = pretrain_in_process(tmp_path, unlabelled)
    for name in (SSL_CHECKPOINT, "history.csv", "plots/loss_curve.png", "config.yaml",
                 "experiment.yaml", "timings.json"):
        assert (out / name).is_file(), name
    assert not (out / pretrain.CHECKPOINT).exists()  # the resume state goes when finished
    ck = torch.load(out / SSL_CHECKPOINT, weights_only=True)
    assert (ck["format"], ck["arch"], ck["input_size"], ck["method"], ck["epochs"],
            ck["images"]) == ("thumbclf-ssl", "resnet18", SMALL, "byol", 2, 9)
    assert ck["recipe"] == "thumbclf" and len(ck["mean"]) == 3
    hist = pd.read_csv(out / "history.csv")
    assert list(hist["epoch"]) == [1, 2] and hist["loss"].notna().all()
    model = build_model("resnet18", 3)
    n = load_ssl(model, out, "resnet18", input_size=SMALL)  # the results folder works too
    keys = backbone_keys(model)
    assert n == len([k for k in keys if not k.endswith("num_batches_tracked")])
    for k in keys:  # every backbone tensor is the checkpoint's, none left at random
        assert torch.equal(model.state_dict()[k], ck["state_dict"][k]), k
    assert model.fc.out_features == 3


def test_interrupted_pretraining_resumes_at_the_next_epoch_with_the_same_result(
        tmp_path, unlabelled, monkeypatch, caplog):
    ref = pretrain_in_process(tmp_path, unlabelled, "ref", max_epochs=3)
    saves = []
    real_save = pretrain.atomic_torch_save

    def save_then_stop(obj, path):  # a kill right after epoch 1's checkpoint
        real_save(obj, path)
        saves.append(obj["epoch"])
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "atomic_torch_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        pretrain_in_process(tmp_path, unlabelled, "cut", max_epochs=3)
    monkeypatch.undo()
    out = tmp_path / "cut"
    assert saves == [1] and (out / pretrain.CHECKPOINT).is_file()
    assert not (out / SSL_CHECKPOINT).exists()
    caplog.clear()  # only the resumed run's messages
    with caplog.at_level(logging.INFO):
        pretrain_in_process(tmp_path, unlabelled, "cut", resume=True, max_epochs=3)
    assert "continuing after epoch 1" in caplog.text
    assert "pretrain epoch 1/3" not in caplog.text and "pretrain epoch 2/3" in caplog.text
    a = pd.read_csv(out / "history.csv")
    b = pd.read_csv(ref / "history.csv")
    assert list(a["epoch"]) == [1, 2, 3]
    pd.testing.assert_series_equal(a["loss"], b["loss"], rtol=1e-5)
    wa = torch.load(out / SSL_CHECKPOINT, weights_only=True)["state_dict"]
    wb = torch.load(ref / SSL_CHECKPOINT, weights_only=True)["state_dict"]
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5) for k in wb)


def test_a_mismatched_or_damaged_checkpoint_is_refused_in_one_line(tmp_path, unlabelled):
    out = pretrain_in_process(tmp_path, unlabelled, max_epochs=1)
    with pytest.raises(ModelError, match="pretrained as a resnet18, but model_name is resnet34") as e:
        load_ssl(build_model("resnet34", 3), out, "resnet34", input_size=SMALL)
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match=f"pretrained on {SMALL}-pixel inputs, but resnet18 here "
                       "takes 224-pixel inputs") as e:
        load_ssl(build_model("resnet18", 3), out, "resnet18")
    assert "\n" not in str(e.value)
    ck = torch.load(out / SSL_CHECKPOINT, weights_only=True)
    del ck["state_dict"]["layer4.1.conv2.weight"]
    torch.save(ck, tmp_path / "damaged.pt")
    with pytest.raises(ModelError, match="1 backbone tensors missing .*layer4.1.conv2.weight"):
        load_ssl(build_model("resnet18", 3), tmp_path / "damaged.pt", "resnet18", input_size=SMALL)
    with pytest.raises(ModelError, match="holds no ssl_checkpoint.pt"):
        load_ssl(build_model("resnet18", 3), tmp_path, "resnet18")


@pytest.mark.slow
def test_scripts_pretrain_then_train_from_it_and_refuse_a_mismatch(tiny_data, tmp_path):
    unlabelled = tiny_data.parent
    exp = write_yaml(tmp_path / "pre.yaml", f"thumbData: {unlabelled}\nmax_epochs: 1\n"
                     "batch_size: 9\nnum_workers: 0\nprojection_dim: 32\n")
    r = run_script("pretrain_thumbclassifier.py", str(exp), "--quiet")
    assert r.returncode == 0, r.stderr
    pre = tmp_path / "pre"
    assert (pre / SSL_CHECKPOINT).is_file() and (pre / "run.log").is_file()
    assert (pre / "plots" / "loss_curve.png").is_file()
    r = run_script("pretrain_thumbclassifier.py", str(exp), "--resume")  # finished: nothing to do
    assert r.returncode == 0 and "pretraining finished earlier" in (pre / "run.log").read_text()
    train = write_yaml(tmp_path / "tr.yaml", f"thumbData: {unlabelled / 'labels.csv'}\n"
                       f"SSL: true\nmodelAdr: pre\ntrainFull: true\nmax_epochs: 1\nstopEpoch: 1\n"
                       "batch_size: 8\nnum_workers: 0\ngradcam: 0\nbootstrap: 0\n")
    r = run_script("train_thumbclassifier.py", str(train), "--quiet")
    assert r.returncode == 0, r.stderr
    n = len([k for k in backbone_keys(build_model("resnet18", 3))
             if not k.endswith("num_batches_tracked")])
    assert f"SSL: loaded all {n} backbone tensors from {pre / SSL_CHECKPOINT}" in (
        tmp_path / "tr" / "run.log").read_text()
    r = run_script("train_thumbclassifier.py", str(train), "--output", str(tmp_path / "tr34"),
                   "--set", "model_name=resnet34", "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {pre / SSL_CHECKPOINT}: pretrained as a resnet18, but model_name is resnet34; "
        "set model_name: resnet18, or pretrain again with model_name: resnet34"]
