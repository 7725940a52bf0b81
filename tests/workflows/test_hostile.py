"""Hostile inputs of the newer features (issue 24): trusted caches, untrusted model files,
tables that a spreadsheet would execute, names that are not text, runs that never end.

Each test failed on thumbclf before its fix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from thumbclf.nn import models
from thumbclf.nn.data import IMAGENET
from thumbclf.core.errors import ModelError
from thumbclf.nn.familiarity import Familiarity
from thumbclf.inputs.images import Preprocessing

CLASSES = ("Biopsy", "IHC", "TMA")


@pytest.fixture(scope="module")
def model_payload(tmp_path_factory) -> dict:
    """A valid model file's contents (untrained resnet18 with an unfamiliar-slide rule)."""
    torch.manual_seed(0)
    net = models.build_model("resnet18", 3)
    bank = np.random.default_rng(0).normal(size=(32, 512)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    path = tmp_path_factory.mktemp("payload") / "model.pt"
    models.save_model(path, models.LoadedModel(
        net, "resnet18", CLASSES, Preprocessing(size=64), IMAGENET, threshold=0.5,
        familiarity=Familiarity(bank, 0.1),
        calibration={"temperature": 1.0, "status": "fitted", "images": 30}))
    return torch.load(path, weights_only=True)


def _altered(payload: dict, tmp_path, **changes):
    obj = dict(payload)
    obj["familiarity"] = dict(payload["familiarity"])
    for key, value in changes.items():
        if key.startswith("familiarity_"):
            obj["familiarity"][key.removeprefix("familiarity_")] = value
        elif value is KeyError:
            obj.pop(key)
        else:
            obj[key] = value
    path = tmp_path / "altered.pt"
    torch.save(obj, path)
    return path


def test_a_valid_model_file_loads(model_payload, tmp_path):
    loaded = models.load_model(_altered(model_payload, tmp_path))
    assert loaded.classes == CLASSES and loaded.familiarity is not None


def _nan_weights(payload):
    state = dict(payload["state_dict"])
    state["fc.weight"] = torch.full_like(state["fc.weight"], math.nan)
    return state


BAD_FIELDS = [
    ("input_size", 100000, "input_size must be a whole number of pixels from 16 to 2048"),
    ("input_size", 0, "input_size must be"),
    ("input_size", "224", "input_size must be"),
    ("format_version", 99, "format_version 99: made by a newer thumbclf"),
    ("temperature", math.nan, "temperature must be a finite number above 0"),
    ("temperature", 0.0, "temperature must be a finite number above 0"),
    ("temperature", -1.0, "temperature must be a finite number above 0"),
    ("threshold", 2.0, "threshold must be a number between 0 and 1"),
    ("threshold", math.nan, "threshold must be a number between 0 and 1"),
    ("classes", ["A", "A", "B"], "classes must be distinct; A appear twice"),
    ("classes", ["A"], "classes must list at least 2 class names"),
    ("mean", "abc", "mean must be 3 finite numbers"),
    ("std", [0.2, 0.0, 0.2], "std must be 3 finite numbers above 0"),
    ("familiarity_k", 0, "familiarity.k must be a whole number from 1 to the bank's rows"),
    ("familiarity_k", 10**6, "familiarity.k must be"),
    ("familiarity_threshold", math.nan, "familiarity.threshold must be a finite number above 0"),
    ("familiarity_threshold", 0.0, "familiarity.threshold must be"),
    ("familiarity_bank", torch.zeros(1, 512).expand(100_000_000, 512),
     "familiarity.bank has shape"),
    ("familiarity_bank", torch.zeros(1, 512, dtype=torch.float16).expand(1000, 512),
     "repeated \\(stride-0\\) rows"),
    ("familiarity_bank", torch.ones(32, 100, dtype=torch.float16),
     "familiarity.bank has 100 features per row, but the model's head takes 512"),
    ("state_dict", KeyError, "state_dict: missing"),
]


@pytest.mark.parametrize("field,value,message", BAD_FIELDS,
                         ids=[f"{f}={str(v)[:20]}" for f, v, _ in BAD_FIELDS])
def test_every_field_of_a_model_file_is_checked(model_payload, tmp_path, field, value, message):
    path = _altered(model_payload, tmp_path, **{field: value})
    with pytest.raises(ModelError, match=message):
        models.load_model(path)


def test_nan_weights_are_refused(model_payload, tmp_path):
    path = _altered(model_payload, tmp_path, state_dict=_nan_weights(model_payload))
    with pytest.raises(ModelError, match="tensors hold NaN or infinite weights \\(first: fc.weight\\)"):
        models.load_model(path)
    torch.save(_nan_weights(model_payload), tmp_path / "legacy.pt")  # a plain state dict
    with pytest.raises(ModelError, match="NaN or infinite weights"):
        models.load_model(tmp_path / "legacy.pt", target_labels=CLASSES)


def _ssl_file(tmp_path, **changes):
    backbone, _ = models.backbone_only("resnet18")
    path = tmp_path / "ssl_checkpoint.pt"
    models.save_ssl_checkpoint(path, backbone, arch="resnet18", prep=Preprocessing(size=224),
                               norm=IMAGENET, description={"method": "byol"})
    obj = torch.load(path, weights_only=True)
    for k, v in changes.items():
        if v is KeyError:
            obj.pop(k)
        else:
            obj[k] = v
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("field,value,message", [
    ("state_dict", KeyError, "state_dict: missing"),
    ("format_version", 99, "format_version 99"),
    ("input_size", 100000, "input_size must be"),
    ("mean", "abc", "mean must be"),
])
def test_every_field_of_an_ssl_checkpoint_is_checked(tmp_path, field, value, message):
    path = _ssl_file(tmp_path, **{field: value})
    with pytest.raises(ModelError, match=message):
        models.read_ssl(path, "resnet18")


def test_an_ssl_checkpoint_of_nan_weights_is_refused(tmp_path):
    path = _ssl_file(tmp_path)
    obj = torch.load(path, weights_only=True)
    obj["state_dict"]["conv1.weight"] = obj["state_dict"]["conv1.weight"] * math.nan
    torch.save(obj, path)
    with pytest.raises(ModelError, match="NaN or infinite weights \\(first: conv1.weight\\)"):
        models.read_ssl(path, "resnet18")


# 1 -- the engine cache is bound to what was verified -----------------------------------------

CPU = torch.device("cpu")


def _choose(model, tmp_path, precision, verify):
    from thumbclf.predict import inference

    file = tmp_path / "m.pt"
    if not file.exists():
        torch.save(model.state_dict(), file)
    return inference.choose(
        inference.ModelSpec(model, file, 64, ("A", "B", "C"), 0.5),
        inference.EngineSpec("openvino", precision, tmp_path / "cache", CPU), verify)


def _evidence(x, labels, calls=None):
    """The gate's evidence (predict.inference.Evidence) of labelled images ``x``, counting how
    often they are decoded in ``calls``."""
    from thumbclf.predict import inference

    def decode():
        if calls is not None:
            calls.append(1)
        return (lambda b: b), [x[i:i + 16] for i in range(0, len(x), 16)], labels, 0
    return inference.Evidence(f"{len(x)}|labelled", len(x), decode)


def _engine_file(tmp_path, name="model.bin"):
    found = [p for p in (tmp_path / "cache" / "engines").glob(f"*/{name}")]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture()
def tiny_net():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3).eval()


@pytest.mark.isolated
def test_a_changed_or_truncated_engine_is_rebuilt_and_verified_again(tiny_net, tmp_path,
                                                                     monkeypatch, caplog):
    pytest.importorskip("openvino", reason="OpenVINO is the optional extra thumbclf[openvino]")
    from thumbclf.predict import inference

    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    x = torch.randn(160, 3, 64, 64)  # enough for the gate's bound (149 at the least)
    with torch.inference_mode():
        y = tiny_net(x).argmax(1).numpy()
    verified = []

    def verify():
        return _evidence(x, y, verified)

    runner, _ = _choose(tiny_net, tmp_path, "bf16", verify)
    expected = runner(x[:4])
    bin_file = _engine_file(tmp_path)
    good = bin_file.read_bytes()
    data = bytearray(good)  # a valid IR whose weights are altered: the last 3 x 512 floats
    tail = np.frombuffer(bytes(data[-6144:]), dtype=np.float32).reshape(3, 512)
    data[-6144:] = np.roll(tail, 1, axis=0).tobytes()
    bin_file.write_bytes(bytes(data))
    caplog.set_level("WARNING")
    runner, why = _choose(tiny_net, tmp_path, "bf16", verify)
    assert "(model.bin changed since it was verified); converting and verifying it again" in caplog.text
    assert len(verified) == 2 and "verified earlier" not in why
    assert torch.allclose(runner(x[:4]), expected, atol=1e-2)
    assert _engine_file(tmp_path).read_bytes() == good
    caplog.clear()
    _engine_file(tmp_path).write_bytes(good[: len(good) // 2])  # truncated
    runner, _ = _choose(tiny_net, tmp_path, "bf16", verify)
    assert "not the one verified" in caplog.text and len(verified) == 3
    assert torch.allclose(runner(x[:4]), expected, atol=1e-2)


@pytest.mark.isolated
def test_a_verdict_flipped_to_passed_is_not_trusted(tiny_net, tmp_path, monkeypatch, caplog):
    pytest.importorskip("openvino", reason="OpenVINO is the optional extra thumbclf[openvino]")
    import json

    from thumbclf.predict import inference
    from thumbclf.core.errors import ConfigError

    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setitem(inference.GATE, "auroc", -1.0)  # a gate nothing can pass
    x = torch.randn(160, 3, 64, 64)
    y = np.arange(160) % 3
    with pytest.raises(ConfigError, match="refused by the quality gate"):
        _choose(tiny_net, tmp_path, "bf16", lambda: _evidence(x, y))
    verdict_file = next((tmp_path / "cache" / "engines" / "verdicts").glob("*.json"))
    verdict = json.loads(verdict_file.read_text())
    verdict["passed"] = True
    verdict_file.write_text(json.dumps(verdict))
    caplog.set_level("WARNING")
    with pytest.raises(ConfigError, match="refused by the quality gate"):
        _choose(tiny_net, tmp_path, "bf16", lambda: _evidence(x, y))
    assert "its verdict is unreadable or was altered" in caplog.text


@pytest.mark.isolated
def test_a_changed_exact_engine_is_converted_again(tiny_net, tmp_path, caplog):
    pytest.importorskip("openvino", reason="OpenVINO is the optional extra thumbclf[openvino]")
    x = torch.randn(4, 3, 64, 64)
    runner, _ = _choose(tiny_net, tmp_path, "fp32", lambda: None)
    expected = runner(x)
    bin_file = _engine_file(tmp_path)
    data = bytearray(bin_file.read_bytes())
    data[-6144:] = bytes(reversed(data[-6144:]))
    bin_file.write_bytes(bytes(data))
    caplog.set_level("WARNING")
    runner, _ = _choose(tiny_net, tmp_path, "fp32", lambda: None)
    assert "model.bin changed since it was verified" in caplog.text
    assert torch.allclose(runner(x), expected, atol=1e-5)


# helpers for the deploys below: untrained model files (a model file is all a deploy needs)

def model_file(path, classes=CLASSES, seed=0):
    """An untrained resnet18 model file for 64-pixel inputs, with ``classes``."""
    torch.manual_seed(seed)
    net = models.build_model("resnet18", len(classes))
    models.save_model(path, models.LoadedModel(net, "resnet18", tuple(classes),
                                               Preprocessing(size=64), IMAGENET, threshold=0.5))
    return path


def deploy(tmp_path, data, model, *extra, name="dep", text=""):
    from thumbclf.cli import main

    exp = tmp_path / f"{name}.yaml"
    if not exp.exists():
        exp.write_text(f"thumbData: {data}\nmodelAdr: {model}\nbootstrap: 0\ngradcam: 0\n"
                       f"num_workers: 0\nengine: torch\ncache_dir: {tmp_path / 'cache'}\n{text}")
    return main("deploy", [str(exp), "--quiet", *extra])


# 2 -- a resume never mixes two models ------------------------------------------------------

def test_resume_refuses_a_changed_model_file(tiny_data, tmp_path, capsys):
    model = model_file(tmp_path / "model.pt", seed=0)
    assert deploy(tmp_path, tiny_data, model) == 0
    (tmp_path / "dep" / "report.html").unlink()  # as if interrupted before its last step
    model_file(model, seed=1)  # another model, same path
    assert deploy(tmp_path, tiny_data, model, "--resume") == 2
    err = capsys.readouterr().err
    assert "model.pt: the model files differ from those the interrupted run predicted with" in err
    model_file(model, seed=0)  # restored: the resume goes on
    assert deploy(tmp_path, tiny_data, model, "--resume") == 0


# 3 -- a training folder that did not finish is refused -------------------------------------

def test_a_locked_or_unfinished_training_folder_is_refused(tiny_data, tmp_path, capsys):
    from thumbclf.core import layout

    run = tmp_path / "cv"
    (run / "fold_1").mkdir(parents=True)
    model_file(run / "fold_1" / "model.pt")
    for f in (layout.CONFIG, layout.RUN_LOG, layout.LOCK):
        (run / f).write_text("")
    (run / layout.SPLITS).write_text("position,PATH,CLASSIFICATION,fold,role\n" + "".join(
        f"{i},x{i}.png,IHC,{k},test\n" for i, k in enumerate((1, 2, 3))))
    assert deploy(tmp_path, tiny_data, run) == 2
    err = capsys.readouterr().err
    assert "it is locked (.thumbclf.lock)" in err
    assert "the training did not finish (report.html, fold_2/model.pt, fold_3/model.pt missing)" in err
    (run / layout.LOCK).unlink()
    assert deploy(tmp_path, tiny_data, run) == 2
    assert "did not finish" in capsys.readouterr().err
    (run / layout.REPORT).write_text("<html></html>")  # finished: deployable
    assert deploy(tmp_path, tiny_data, run) == 0


# 5 -- no table runs formulas in a spreadsheet ------------------------------------------------

HOSTILE = ('=HYPERLINK("http://example.org","click")', "+cmd|' /c calc'!A1", "@SUM(A1)",
           "-2+3", "'quoted", "NA", "null")


def test_neutralised_cells_read_back_exactly(tmp_path):
    import pandas as pd

    from thumbclf.core import table
    from thumbclf.core.files import atomic_csv

    df = pd.DataFrame({"PATH": list(HOSTILE), HOSTILE[0]: [0.5] * len(HOSTILE),
                       "n": range(len(HOSTILE))})
    atomic_csv(df, tmp_path / "t.csv")
    text = (tmp_path / "t.csv").read_text()
    cells = [c for line in text.splitlines() for c in line.split(",")]
    assert not any(c.lstrip('"').startswith(("=", "+", "@", "-2")) for c in cells), text
    back = table.read_csv(tmp_path / "t.csv", numeric=["n", HOSTILE[0]])
    assert list(back.columns) == list(df.columns) and back["PATH"].tolist() == list(HOSTILE)
    assert back["n"].tolist() == list(range(len(HOSTILE)))


def test_a_deploy_writes_no_formula_into_any_table(tmp_path):
    import csv

    import pandas as pd

    from thumbclf.core import table
    from thumbclf.inputs import synth

    classes = HOSTILE[:3]
    data = tmp_path / "data"
    labels = synth.generate(data, per_class=4, seed=5, sides=(40, 80),
                            classes=("IHC", "TMA", "Fat"))
    df = pd.read_csv(labels)
    df["CLASSIFICATION"] = df["CLASSIFICATION"].map(dict(zip(("IHC", "TMA", "Fat"), classes)))
    df.to_csv(labels, index=False)
    model = model_file(tmp_path / "model.pt", classes=classes)
    assert deploy(tmp_path, labels, model, text="prediction_threshold: 0.0\n") == 0
    written = sorted((tmp_path / "dep").rglob("*.csv"))
    assert {"predictions.csv", "metrics.csv", "confusion_matrix.csv"} <= {p.name for p in written}
    for path in written:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                bad = [c for c in row if c.startswith(("=", "+", "@"))]
                assert not bad, (path.name, bad)
    back, found = table.read(tmp_path / "dep" / "predictions.csv", classes)
    assert set(back["CLASSIFICATION"]) == set(classes) and set(back["model_prediction"]) <= set(classes)


# 7 -- a training that diverges writes no model file ----------------------------------------

def test_a_diverging_training_stops_without_a_model_file(tiny_data, tmp_path, monkeypatch, capsys):
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


def test_nan_weights_are_never_written(tmp_path):
    from thumbclf.core.errors import ConfigError

    net = models.build_model("resnet18", 3)
    with torch.no_grad():
        net.fc.weight.fill_(math.nan)
    with pytest.raises(ConfigError, match="training diverged: 1 tensors .* \\(first: fc.weight\\)"):
        models.save_model(tmp_path / "model.pt", models.LoadedModel(
            net, "resnet18", CLASSES, Preprocessing(size=64), IMAGENET, threshold=0.5))
    backbone, _ = models.backbone_only("resnet18")
    with torch.no_grad():
        backbone.conv1.weight.fill_(math.inf)
    with pytest.raises(ConfigError, match="training diverged"):
        models.save_ssl_checkpoint(tmp_path / "ssl_checkpoint.pt", backbone, arch="resnet18",
                                   prep=Preprocessing(size=224), norm=IMAGENET, description={})
    assert not list(tmp_path.iterdir())


# 4 -- nothing written outside the results and cache folders --------------------------------

@pytest.mark.slow
def test_a_run_with_a_fresh_home_writes_nothing_outside_its_folders(tiny_data, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    engine = "engine: openvino\nprecision: fp32\n"
    try:
        import openvino  # noqa: F401
    except ImportError:
        engine = ""  # the telemetry part needs the optional extra
    (work / "t.yaml").write_text(f"thumbData: {tiny_data}\ntrainFull: true\npretrained: false\n"
                                 "max_epochs: 1\nbootstrap: 0\ngradcam: 0\nnum_workers: 0\n")
    (work / "d.yaml").write_text(f"thumbData: {tiny_data}\nmodelAdr: t\nbootstrap: 0\ngradcam: 0\n"
                                 f"num_workers: 0\n{engine}")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("XDG_", "MPLCONFIGDIR", "TORCH_HOME", "CI"))}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    code = ("import sys; from thumbclf.cli import main; "
            "sys.exit(main('train', ['t.yaml', '--quiet']) or main('deploy', ['d.yaml', '--quiet']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == []
    assert sorted(p.name for p in work.iterdir()) == ["d", "d.yaml", "t", "t.yaml", "thumbclf-cache"]


# 8 -- names that are not text, names too long ----------------------------------------------

def _odd_names(tmp_path):
    import os
    import shutil

    from thumbclf.inputs import synth

    data = tmp_path / "data"
    synth.generate(data, per_class=6, seed=2, sides=(40, 70), classes=("IHC", "TMA"))
    src = next((data / "IHC").glob("*.jpg"))
    odd = os.fsencode(data / "IHC") + b"/\xff\xfe.jpg"  # not UTF-8, as in old archives
    shutil.copy(src, odd)
    return data, os.fsdecode(odd)


def test_a_name_that_is_not_utf8_or_too_long_gets_its_row(tmp_path):
    import pandas as pd

    from thumbclf.core import table

    data, odd = _odd_names(tmp_path)
    model = model_file(tmp_path / "model.pt", classes=("IHC", "TMA"))
    assert deploy(tmp_path, data, model, text="hasLabels: false\n") == 0
    back = table.read_csv(tmp_path / "dep" / "predictions.csv")
    row = back[back["PATH"] == odd]
    assert len(row) == 1 and row["error"].iloc[0] == "" and row["model_prediction"].iloc[0]
    assert len(back) == 13
    # item 16: the table is UTF-8 that a standard reader takes, the name escaped visibly
    plain = pd.read_csv(tmp_path / "dep" / "predictions.csv")
    assert plain["PATH"].str.endswith("/\\xff\\xfe.jpg").sum() == 1
    long_name = "y" * 300 + ".jpg"
    pd.DataFrame({"PATH": [str(next((data / "TMA").glob("*.jpg"))), long_name],
                  "CLASSIFICATION": ["TMA", "TMA"]}).to_csv(data / "t.csv", index=False)
    assert deploy(tmp_path, data / "t.csv", model, name="dep2") == 0
    back = table.read_csv(tmp_path / "dep2" / "predictions.csv")
    assert back["error"].iloc[0] == "" and "File name too long" in back["error"].iloc[1]


def test_tables_escape_names_that_are_not_utf8_reversibly(tmp_path):
    """Issue 33, item 16: a table held the raw bytes of such a name, so pandas' default
    reader failed on it; now each byte is \\xNN and read back exactly."""
    import random

    import pandas as pd

    from thumbclf.core import table
    from thumbclf.core.files import atomic_csv

    odd = b"caf\xe9 \xff.png".decode("utf-8", "surrogateescape")
    names = [odd, "C:\\slides\\a.svs", "\\x80 as text", "=cmd", "plain"]
    atomic_csv(pd.DataFrame({"PATH": table.text(names), "n": range(5)}), tmp_path / "t.csv")
    raw = (tmp_path / "t.csv").read_bytes().decode("utf-8")  # strict: valid UTF-8
    assert "caf\\xe9 \\xff.png" in raw and "C:\\slides\\a.svs" in raw  # Windows paths as they are
    assert table.read_csv(tmp_path / "t.csv")["PATH"].tolist() == names
    rng = random.Random(0)
    alphabet = ["\\", "x", "5", "c", "C", "8", "e", "f", "\udc80", "\udcff", "a"]
    for _ in range(2000):
        cell = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        assert table.unescape(table.escape(cell)) == cell
        table.escape(cell).encode("utf-8")


@pytest.mark.slow
def test_training_with_a_name_that_is_not_utf8(tmp_path):
    from thumbclf.cli import main
    from thumbclf.core import table

    data, odd = _odd_names(tmp_path)
    exp = tmp_path / "t.yaml"
    exp.write_text(f"thumbData: {data}\ntrainFull: true\npretrained: false\nmax_epochs: 1\n"
                   "bootstrap: 0\ngradcam: 0\nnum_workers: 0\n")
    assert main("train", [str(exp), "--quiet"]) == 0
    assert odd in table.read_csv(tmp_path / "t" / "splits.csv")["PATH"].tolist()


# 9 -- one table reader: 'NA' and 'null' stay labels -------------------------------------------

def test_na_and_null_labels_survive_every_reader(tmp_path):
    import pandas as pd

    from thumbclf.core import table
    from thumbclf.core.files import atomic_csv
    from thumbclf.inputs import splits

    fold = pd.DataFrame({"PATH": ["a.png", "b.png"], "CLASSIFICATION": ["NA", "null"],
                         "fold": [1, 1], "NA": [0.9, 0.2], "null": [0.1, 0.8],
                         "model_prediction": ["NA", "null"], "threshold": [0.5, 0.5]})
    atomic_csv(fold, tmp_path / "predictions.csv")
    back = table.read_fold(tmp_path / "predictions.csv")
    assert back["CLASSIFICATION"].tolist() == ["NA", "null"]
    assert back["model_prediction"].tolist() == ["NA", "null"] and back["NA"].tolist() == [0.9, 0.2]
    (tmp_path / "fold_1").mkdir()
    sp = pd.DataFrame({"position": [0, 1], "fold": [1, 1], "role": ["val", "val"]})
    splits.save(sp, ["a.png", "b.png"], ["NA", "null"], None, tmp_path / "splits.csv")
    got = splits.validation_of_model(tmp_path / "fold_1" / "model.pt")
    assert [label for _, label in got] == ["NA", "null"]


def test_every_table_is_read_by_the_one_reader():
    import re

    from conftest import ROOT

    readers = re.compile(r"\bpd\.read_(csv|excel|table)\(|\bcsv\.(DictReader|reader)\(")
    found = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "thumbclf").rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if readers.search(line) and p.name != "table.py" and "one reader" not in line]
    allowed = {"thumbclf/inputs/samples.py"}  # the spreadsheet reader (pd.read_excel), then as_written
    assert [f for f in found if f.split(":")[0] not in allowed] == []


# 10 -- labels that differ from the model's classes only by case --------------------------------

def test_deploy_labels_that_differ_only_in_case_are_refused(tiny_data, tmp_path, capsys):
    import pandas as pd

    df = pd.read_csv(tiny_data)
    df["CLASSIFICATION"] = df["CLASSIFICATION"].replace({"IHC": "ihc"})
    df["PATH"] = [str(tiny_data.parent / p) for p in df["PATH"]]
    df.to_csv(tmp_path / "labels.csv", index=False)
    model = model_file(tmp_path / "model.pt")
    assert deploy(tmp_path, tmp_path / "labels.csv", model) == 2
    assert "labels differ from the model's classes only in upper/lower case: 'ihc' (the model's 'IHC')" in capsys.readouterr().err


# 12 -- runs that never end ---------------------------------------------------------------------

def test_a_fifo_listed_in_a_table_is_an_error_row(tiny_data, tmp_path):
    import os

    import pandas as pd

    from thumbclf.core import table

    (tmp_path / "pipes").mkdir()  # not beside the cache_dir: that is refused (issue 33)
    os.mkfifo(tmp_path / "pipes" / "pipe.png")
    paths = [str(tiny_data.parent / p) for p in pd.read_csv(tiny_data)["PATH"][:2]]
    pd.DataFrame({"PATH": [*paths, str(tmp_path / "pipes" / "pipe.png"), "/dev/zero"]}).to_csv(
        tmp_path / "t.csv", index=False)
    model = model_file(tmp_path / "model.pt")
    assert deploy(tmp_path, tmp_path / "t.csv", model, text="hasLabels: false\n") == 0
    errors = table.read_csv(tmp_path / "dep" / "predictions.csv")["error"].tolist()
    assert errors[:2] == ["", ""]
    assert "a named pipe (FIFO), not a regular file" in errors[2]
    assert "/dev/zero: a device, not a regular file" in errors[3]


def test_an_unreachable_ray_address_ends_at_once(tiny_data, tmp_path):
    """In this process (issue 32): the address is refused before any Ray driver starts."""
    pytest.importorskip("ray", reason="Ray is the optional extra thumbclf[ray]")
    from conftest import run_command

    model = model_file(tmp_path / "model.pt")
    exp = tmp_path / "r.yaml"
    exp.write_text(f"thumbData: {tiny_data}\nmodelAdr: {model}\nexecutor: ray\n"
                   "ray_address: localhost:1\nbootstrap: 0\ngradcam: 0\n")
    r = run_command("deploy", exp, "--quiet")
    assert r.returncode == 2, r.stderr
    assert not pytest.importorskip("ray").is_initialized()
    assert "ray_address: cannot reach a Ray cluster at localhost:1 within 10s" in r.stderr


# 13 -- a spreadsheet that inflates -------------------------------------------------------------

def test_a_spreadsheet_that_inflates_is_refused_before_it_is_read(tmp_path, monkeypatch):
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


# 14 -- adapt_bn on a handful of images -----------------------------------------------------------

def test_adapt_bn_needs_enough_deploy_images(tiny_data, tmp_path, capsys):
    import pandas as pd

    df = pd.read_csv(tiny_data).head(3)
    df["PATH"] = [str(tiny_data.parent / p) for p in df["PATH"]]
    df.to_csv(tmp_path / "three.csv", index=False)
    model = model_file(tmp_path / "model.pt")
    assert deploy(tmp_path, tmp_path / "three.csv", model, text="adapt_bn: true\n") == 2
    assert "adapt_bn needs at least 32 readable deploy images" in capsys.readouterr().err


def test_adapt_bn_counts_copies_of_one_picture_once(tiny_data, tmp_path, capsys):
    """Issue 33, item 18: 42 deploy images, 32 of them copies of one thumbnail, passed the
    32-image minimum and turned an Undecided slide into a decided one at 0.972."""
    import shutil

    import pandas as pd

    df = pd.read_csv(tiny_data).head(10)
    paths = [str(tiny_data.parent / p) for p in df["PATH"]]
    (tmp_path / "copies").mkdir()
    for k in range(32):
        shutil.copy(paths[0], tmp_path / "copies" / f"copy{k}.png")
        paths.append(str(tmp_path / "copies" / f"copy{k}.png"))
    pd.DataFrame({"PATH": paths}).to_csv(tmp_path / "many.csv", index=False)
    model = model_file(tmp_path / "model.pt")
    assert deploy(tmp_path, tmp_path / "many.csv", model,
                  text="adapt_bn: true\nhasLabels: false\n") == 2
    err = capsys.readouterr().err
    assert "adapt_bn needs at least 32 readable deploy images" in err
    assert "got 10 (32 more were copies of these: copies count once)" in err


# 11 -- linked subfolders, many pages, NaN pictures ---------------------------------------------

def test_a_linked_subfolder_of_a_folder_input_is_followed(tmp_path):
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


def test_a_multipage_tiff_is_read_at_its_largest_page(tmp_path, caplog):
    from PIL import Image

    from thumbclf.inputs.images import open_rgb

    blank = Image.new("RGB", (16, 16), "white")
    tissue = Image.new("RGB", (120, 90), (200, 110, 170))
    blank.save(tmp_path / "pages.tif", save_all=True, append_images=[tissue])
    img = open_rgb(tmp_path / "pages.tif", target=None, max_pixels=10**8)
    assert img.size == (120, 90) and img.getpixel((5, 5)) == (200, 110, 170)
    frames = [Image.new("RGB", (40, 40), c) for c in ("white", (200, 110, 170))]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    caplog.set_level("WARNING")
    open_rgb(tmp_path / "anim.png", target=None, max_pixels=10**8)
    assert "anim.png: 2 pages or frames of one size; page 1 is used" in caplog.text


def test_an_all_nan_float_tiff_is_an_error(tmp_path):
    from PIL import Image

    from thumbclf.core.errors import ImageReadError
    from thumbclf.inputs.images import open_rgb

    Image.fromarray(np.full((20, 20), np.nan, dtype=np.float32), "F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageReadError, match="nan.tif: every pixel is NaN or infinite"):
        open_rgb(tmp_path / "nan.tif", target=None, max_pixels=10**8)
    half = np.full((20, 20), np.nan, dtype=np.float32)
    half[:10] = 100.0
    Image.fromarray(half, "F").save(tmp_path / "half.tif")
    arr = np.asarray(open_rgb(tmp_path / "half.tif", target=None, max_pixels=10**8))
    assert arr[:10].min() == 100 and arr[10:].max() == 0


# smaller: thumbclf evaluate -------------------------------------------------------------------

def _table(tmp_path, text, name="predictions.csv"):
    folder = tmp_path / name.split(".")[0]
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def test_evaluate_refuses_tables_it_cannot_honestly_evaluate(tmp_path, capsys):
    from thumbclf.cli import evaluate_main

    head = "PATH,CLASSIFICATION,A,B,model_prediction,unfamiliarity\n"
    empty = _table(tmp_path, head)
    assert evaluate_main([str(empty), "--bootstrap", "0"]) == 2
    assert "no rows to evaluate (only a header" in capsys.readouterr().err
    twice = _table(tmp_path, "PATH,CLASSIFICATION,A,A,B,model_prediction\nx.png,A,0.5,0.2,0.3,A\n",
                   "twice.csv")
    assert evaluate_main([str(twice), "--bootstrap", "0"]) == 2
    assert "the columns A appear twice" in capsys.readouterr().err
    nan = _table(tmp_path, head + "x.png,A,0.9,0.1,A,nan\ny.png,B,0.2,0.8,B,0.5\n", "nan.csv")
    assert evaluate_main([str(nan), "--bootstrap", "0"]) == 2
    assert "column unfamiliarity: 1 values are not numbers of 0 or more (row 2)" in capsys.readouterr().err
    good = _table(tmp_path, head + "x.png,A,0.9,0.1,A,0.2\ny.png,B,0.2,0.8,B,\n", "good.csv")
    assert evaluate_main([str(good), "--bootstrap", "0"]) == 0
    capsys.readouterr()
    assert evaluate_main([str(good), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert "holds an earlier evaluation" in err and "--resume" not in err


# smaller: the Python API ------------------------------------------------------------------------

def test_the_api_takes_numpy_numbers_and_gives_an_empty_picture_an_error_row(tiny_data, tmp_path):
    from PIL import Image

    import thumbclf
    from thumbclf.config import TRAIN
    from thumbclf.config.files import load_experiment

    params, _ = load_experiment({"thumbData": str(tiny_data), "max_epochs": np.int64(2),
                                 "lr": np.float32(0.01), "augment": np.bool_(False)},
                                workflow=TRAIN, output=tmp_path / "o")
    assert params.max_epochs == 2 and params.augment is False
    model = thumbclf.load_model(model_file(tmp_path / "model.pt"))
    table = model.predict([Image.new("RGB", (0, 0)), Image.new("RGB", (50, 40), "white")])
    assert table["error"].tolist() == ["a picture of 0 x 0 pixels: nothing to classify", ""]
    assert table["model_prediction"].iloc[1] != ""


def test_a_cache_folder_in_the_input_folder_is_refused_before_anything_is_written(tmp_path, capsys):
    from thumbclf.inputs import synth

    data = tmp_path / "data"
    synth.generate(data, per_class=2, seed=1, sides=(40, 60), classes=("IHC", "TMA"))
    before = sorted(p.name for p in data.rglob("*"))
    model = model_file(tmp_path / "model.pt", classes=("IHC", "TMA"))
    (tmp_path / "dep.yaml").write_text(f"thumbData: {data}\nmodelAdr: {model}\ncache_dir: {data}\n")
    assert deploy(tmp_path, data, model) == 2
    assert f"cache_dir {data} is the input folder (thumbData: {data})" in capsys.readouterr().err
    assert sorted(p.name for p in data.rglob("*")) == before


def test_quiet_keeps_library_warnings_off_the_console(tmp_path, capsys):
    import logging
    import warnings

    from thumbclf.core.logs import remove_handlers, setup_logging

    setup_logging(tmp_path, quiet=True)
    try:
        warnings.warn("No artists with labels found to put in legend", UserWarning)
        logging.getLogger("thumbclf.test").warning("a warning of thumbclf's own")
    finally:
        remove_handlers()
    err = capsys.readouterr().err
    assert "a warning of thumbclf's own" in err and "No artists" not in err
    assert "No artists with labels" in (tmp_path / "run.log").read_text()


@pytest.mark.slow
def test_a_quiet_int8_deploy_prints_no_progress_bar(tmp_path):
    pytest.importorskip("nncf", reason="int8 needs the optional extra thumbclf[openvino]")
    from conftest import run_script

    from thumbclf.inputs import synth

    data = synth.generate(tmp_path / "data", per_class=50, seed=3, sides=(40, 70),
                          classes=CLASSES)  # 150: enough images for the gate's bound (149)
    model = model_file(tmp_path / "model.pt")
    exp = tmp_path / "q.yaml"
    exp.write_text(f"thumbData: {data}\nmodelAdr: {model}\nbootstrap: 0\ngradcam: 0\n"
                   f"num_workers: 0\nengine: openvino\nprecision: int8\n"
                   f"cache_dir: {tmp_path / 'cache'}\n")
    r = run_script("deploy_thumbclassifier.py", str(exp), "--quiet", process=True)
    assert r.returncode == 0, r.stderr
    assert "openvino int8 (verified" in (tmp_path / "q" / "run.log").read_text()
    console = r.stdout + r.stderr
    for bar in ("Statistics collection", "Bias correction", "\u2501", "100%", "nncf"):
        assert bar not in console, console
    assert r.stdout == ""


def test_nncf_speaks_through_thumbclf_logging(tmp_path, capfd):
    pytest.importorskip("nncf", reason="int8 needs the optional extra thumbclf[openvino]")
    import logging

    from thumbclf.core.logs import remove_handlers, setup_logging
    from thumbclf.predict.quantise import nncf_output

    setup_logging(tmp_path, quiet=True)
    nncf_log = logging.getLogger("nncf")
    try:
        with nncf_output(progress=False):
            nncf_log.info("an INFO of NNCF's")
            nncf_log.warning("a WARNING of NNCF's")
    finally:
        remove_handlers()
    out, err = capfd.readouterr()
    assert out == "" and "an INFO" not in err and "a WARNING of NNCF's" in err
    log = (tmp_path / "run.log").read_text()
    assert "an INFO of NNCF's" in log and "a WARNING of NNCF's" in log


def test_ray_log_lines_on_stderr_go_to_run_log(tmp_path, capfd):
    import os

    from thumbclf.core.logs import remove_handlers, setup_logging
    from thumbclf.predict.ray_backend import ray_lines_to_run_log

    setup_logging(tmp_path, quiet=True)
    try:
        with ray_lines_to_run_log():  # as Ray's C++ logger and thumbclf's console write them
            os.write(2, b"[2026-12-02 03:58:07,818 E 11120 11120] core_worker.cc:2465: Actor "
                        b"with class name: 'MapWorker(MapBatches(_Infer))' has constructor ...\n")
            os.write(2, b"a line of thumbclf's own\n")
            os.write(2, b"[2026-12-02 03:58:08,001 F 11120 11120] raylet.cc:1: a fatal one\n")
            os.write(2, b"a last line without its newline")
    finally:
        remove_handlers()
    err = capfd.readouterr().err
    assert err.splitlines() == ["a line of thumbclf's own",
                                "[2026-12-02 03:58:08,001 F 11120 11120] raylet.cc:1: a fatal one",
                                "a last line without its newline"]
    assert "core_worker.cc:2465: Actor with class name" in (tmp_path / "run.log").read_text()


@pytest.mark.isolated
def test_load_model_caches_beside_the_model_not_above_the_current_folder(tmp_path, monkeypatch):
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


@pytest.mark.slow
def test_a_hangup_ends_like_ctrl_c(tiny_data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    exp = tmp_path / "t.yaml"
    exp.write_text(f"thumbData: {tiny_data}\ntrainFull: true\npretrained: false\nmax_epochs: 20\n"
                   "stopEpoch: 20\nbootstrap: 0\ngradcam: 0\nnum_workers: 0\n")
    proc = subprocess.Popen([sys.executable, "-m", "thumbclf", "train", str(exp)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.time() + 300
    while not (tmp_path / "t" / "full" / "checkpoint.pt").is_file() and time.time() < deadline:
        time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGHUP)  # the terminal closed
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "continue with the same command plus --resume" in err, err


def test_a_model_whose_outputs_are_not_finite_is_an_error(tiny_data, tmp_path, capsys):
    model = model_file(tmp_path / "model.pt")
    obj = torch.load(model, weights_only=True)
    obj["state_dict"]["fc.weight"] = torch.full_like(obj["state_dict"]["fc.weight"], 3e38)
    torch.save(obj, model)  # finite weights whose logits overflow to infinity
    assert deploy(tmp_path, tiny_data, model) == 2
    err = capsys.readouterr().err
    assert "model.pt: computed outputs that are not finite (NaN or infinity)" in err
    assert not (tmp_path / "dep" / "predictions.csv").exists()
