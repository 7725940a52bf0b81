"""The thumbclf command: subcommands, --version, --help, init; in-process where no run is needed."""

import os
import subprocess
import sys

import pytest
import yaml

import thumbclf
from conftest import ROOT
from thumbclf.cli import command
from thumbclf.config import DEPLOY, KEYS, TRAIN, spelling, validate


def test_version_and_help_list_the_subcommands(capsys):
    with pytest.raises(SystemExit) as done:
        command(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"thumbclf {thumbclf.__version__}"
    with pytest.raises(SystemExit) as done:
        command(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    for sub in ("train", "deploy", "evaluate", "init"):
        assert f"\n    {sub} " in out, out
    with pytest.raises(SystemExit) as done:
        command(["train", "--help"])
    out = capsys.readouterr().out
    for option in ("--output", "--set", "--resume", "--quiet", "--debug", "--ExpFile"):
        assert option in out
    with pytest.raises(SystemExit) as done:
        command([])
    assert done.value.code == 2


@pytest.mark.parametrize("flag, workflow", [("--train", TRAIN), ("--deploy", DEPLOY), (None, None)])
def test_init_writes_a_commented_valid_starting_file(tmp_path, capsys, flag, workflow):
    path = tmp_path / "sub" / "exp.yaml"
    assert command(["init", *([flag] if flag else []), str(path)]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    text = path.read_text()
    raw = yaml.safe_load(text)
    needed = {"thumbData", "modelAdr"} if workflow == DEPLOY else {"thumbData"}
    assert set(raw) == needed  # everything else is commented out: the defaults apply
    for key in KEYS:
        if workflow is None or workflow in key.workflows:
            assert f"{spelling(key)}:" in text, spelling(key)
        else:
            assert f"# {spelling(key)}:" not in text, spelling(key)
    params = validate(raw, workflow=workflow or TRAIN, source=path)
    assert params.thumb_data == tmp_path / "sub" / "data" / "labels.csv"
    uncommented = yaml.safe_load("\n".join(line[2:] for line in text.splitlines()
                                           if line.startswith("# ") and ": " in line
                                           and line[2:].split(":")[0] in {spelling(k) for k in KEYS}))
    validate({**uncommented, **raw}, workflow=workflow or TRAIN, source=path)  # defaults valid


def test_init_never_overwrites_and_wants_yaml(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text("mine\n")
    assert command(["init", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}: already exists; thumbclf init never overwrites a file. "
                   "Choose another name"]
    assert path.read_text() == "mine\n"
    assert command(["init", str(tmp_path / "exp.json")]) == 2
    assert "name it .yaml or .yml" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        command(["init", "--train", "--deploy", str(tmp_path / "x.yaml")])
    assert done.value.code == 2


def test_evaluate_subcommand_is_the_evaluate_command(tmp_path, capsys):
    assert command(["evaluate", str(tmp_path / "none.csv")]) == 2
    assert "none.csv: not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        command(["evaluate", "--help"])
    assert done.value.code == 0 and "usage: thumbclf evaluate" in capsys.readouterr().out


def test_python_m_thumbclf_and_errors_exit_2_in_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "thumbclf", "--version"], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"thumbclf {thumbclf.__version__}"
    exp = tmp_path / "bad.yaml"
    exp.write_text("thumbData: d\nfoldNumber: 1\n")
    r = subprocess.run([sys.executable, "-m", "thumbclf", "train", str(exp)], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {exp}: foldNumber must be between 2 and 100; got 1"]


def test_a_console_that_cannot_encode_a_folder_name_does_not_crash_the_last_line(tmp_path,
                                                                                 monkeypatch):
    """Issue 33, item 20: a console that cannot encode a folder name crashed the final print."""
    import io
    import sys

    import pandas as pd
    from PIL import Image

    from thumbclf import cli

    folder = tmp_path / "résultats"
    folder.mkdir()
    Image.new("RGB", (40, 30), "white").save(tmp_path / "a.png")
    pd.DataFrame({"PATH": [str(tmp_path / "a.png")], "A": [0.9], "B": [0.1],
                  "model_prediction": ["A"], "undecided_reason": [""], "error": [""],
                  "threshold": [0.5]}).to_csv(folder / "predictions.csv", index=False)
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.command(["review", str(folder), "--quiet"]) == 0
    out.flush()
    assert b"r\\xe9sultats" in out.buffer.getvalue()
