"""The thumbclf command: subcommands, --version, --help, init; in-process where no run is needed."""

import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, run_script, write_yaml
import thumbclf
from thumbclf.cli import command, main
from thumbclf.config import DEPLOY, KEYS, PRETRAIN, TRAIN, spelling, validate


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
    for option in ("--output", "--set", "--resume", "--quiet", "--debug"):
        assert option in out
    # issue 31: EXPERIMENT is required, the prototype's --ExpFile belongs to its scripts, and
    # the footer names a command, not a file of the checkout
    assert "--ExpFile" not in out and "[EXPERIMENT]" not in out and " EXPERIMENT\n" in out
    assert "template.yaml" not in out and "thumbclf init --train FILE" in " ".join(out.split())
    from thumbclf.cli import parser

    assert "--ExpFile" in parser(TRAIN).format_help()
    with pytest.raises(SystemExit) as done:
        command([])
    assert done.value.code == 2


def test_a_mistyped_command_gets_a_suggestion(capsys):
    """Issue 31: thumbclf trian says which command was meant."""
    assert command(["trian", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "'trian' is not a command; did you mean 'train'?" in err
    assert command(["frobnicate"]) == 2
    assert "commands: train, deploy, pretrain, evaluate, review, merge, init" in capsys.readouterr().err


@pytest.mark.parametrize("flag, workflow", [("--train", TRAIN), ("--deploy", DEPLOY),
                                            ("--pretrain", PRETRAIN), (None, None)])
def test_init_writes_a_commented_valid_starting_file(tmp_path, capsys, flag, workflow):
    path = tmp_path / "sub" / "exp.yaml"
    assert command(["init", *([flag] if flag else []), str(path)]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    text = path.read_text()
    raw = yaml.safe_load(text)
    # everything else is commented out: the defaults apply (deploy: an unlabelled folder)
    needed = {DEPLOY: {"thumbData", "modelAdr", "hasLabels"}}.get(workflow, {"thumbData"})
    assert set(raw) == needed
    serves = (workflow,) if workflow else (TRAIN, DEPLOY)
    for key in KEYS:
        used = [w for w in serves if w in key.workflows]
        if used:
            assert f"{spelling(key)}:" in text, spelling(key)
        else:  # e.g. pretraining's keys in a train and deploy file (issue 31)
            assert f"# {spelling(key)}:" not in text, spelling(key)
    for marker in ("[pretrain]", "[train, deploy]"):
        assert marker not in text
    if workflow is None:  # a key every workflow shares carries no marker (issue 31)
        assert "[train] Images per batch" not in text and "[deploy] Deploy:" in text
    params = validate(raw, workflow=workflow or TRAIN, source=path)
    if workflow == DEPLOY:
        assert params.thumb_data == tmp_path / "sub" / "slides" and not params.has_labels
    else:
        assert params.thumb_data == tmp_path / "sub" / "data" / "labels.csv"
    uncommented = yaml.safe_load("\n".join(line[2:] for line in text.splitlines()
                                           if line.startswith("# ") and ": " in line
                                           and line[2:].split(":")[0] in {spelling(k) for k in KEYS}))
    validate({**uncommented, **raw}, workflow=workflow or TRAIN, source=path)  # defaults valid


def test_init_deploy_leads_to_a_deploy_of_a_flat_unlabelled_folder(tmp_path, tiny_data,
                                                                  tiny_model, capsys):
    """Issue 31: the README's steps (init --deploy, set thumbData and modelAdr, deploy) work on
    the main use case, a flat folder of slides without labels."""
    from conftest import run_cli

    flat = tmp_path / "slides"
    flat.mkdir()
    pictures = sorted(p for p in tiny_data.parent.rglob("*") if p.suffix in (".jpg", ".png"))
    for i, picture in enumerate(pictures[:5]):
        (flat / f"slide_{i}{picture.suffix}").write_bytes(picture.read_bytes())
    (flat / "notes.txt").write_text("not a slide")  # counted at the end, not silently skipped
    path = tmp_path / "archive.yaml"
    assert command(["init", "--deploy", str(path)]) == 0
    text = path.read_text()
    text = text.replace("thumbData: slides/", f"thumbData: {flat}")
    text = text.replace("modelAdr: my_training", f"modelAdr: {tiny_model}")
    path.write_text(text + "gradcam: 0\nbootstrap: 0\nnum_workers: 0\n"
                    "prediction_threshold: 1.0\n")  # every slide Undecided: the hint shows
    r = run_cli("deploy", [str(path)])
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "archive" / "predictions.csv")
    assert table.is_file() and len(table.read_text().splitlines()) == 6
    # the run ends with what to do next
    console = r.stdout + r.stderr
    assert f"5 Undecided: work through them with: thumbclf review {tmp_path / 'archive'}" in console
    assert "also left out: 1 file in thumbData that are not images or slides" in console


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
    out = capsys.readouterr().out
    assert done.value.code == 0 and "usage: thumbclf evaluate" in out
    assert "--quiet" in out and "--debug" in out  # as every other command (issue 31)


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


def test_error_lines_carry_no_control_characters(tmp_path, capsys):
    """Issue 10, item 10: nothing lost."""
    exp = write_yaml(tmp_path / "e.yaml", 'thumbData: "no\\nsuch\\u001b[31m"\n"lr\\u001b[2J": 1\n')
    assert main("train", [str(exp)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "unknown key" in lines[0]
    (tmp_path / "ok.yaml").write_text('thumbData: "no\\nsuch"\npretrained: false\n')
    assert main("train", [str(tmp_path / "ok.yaml")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "thumbData" in line]
    assert len(lines) == 1 and "no\\nsuch: thumbData not found" in lines[0], err


@pytest.mark.slow
def test_unwritable_output_via_the_script_is_one_line(tmp_path, tiny_data):
    """Issue 5, messy archives."""
    (tmp_path / "blocker").write_text("x")
    exp = write_yaml(tmp_path / "e.yaml", f"thumbData: {tiny_data}\n")
    r = run_script("train_thumbclassifier.py", str(exp), "--output", str(tmp_path / "blocker" / "x"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "cannot write the results folder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path):
    """Issue 5, messy archives."""
    exp = write_yaml(tmp_path / "e.yaml", "thumbData: nowhere\n")
    r = run_script("train_thumbclassifier.py", str(exp), "--debug")
    assert r.returncode == 2 and "Traceback" in r.stderr and "thumbData not found" in r.stderr
