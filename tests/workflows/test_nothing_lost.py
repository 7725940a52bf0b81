"""Nothing lost, nothing overwritten, nothing written where it does not belong.

One test per defect found by a hostile user; each failed on thumbclf 1.0.
"""

import errno
import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_TRAIN, run_script, write_yaml
from thumbclf.inputs import synth
from thumbclf.cli import main
from thumbclf.config import DEPLOY
from thumbclf.core.decide import decide
from thumbclf.evaluate import main as evaluate_main
from thumbclf.core.layout import LOCK
from thumbclf.core.files import FILE_MODE, append_whole, atomic_text, repair_tail
from thumbclf.outputs.sorting import sort_copies

FAST = TINY_TRAIN  # the one fast settings block (conftest)


def checksums(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model  # the session's tiny model (conftest)


# 1 ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_hostile_labels_write_only_inside_the_results_folder(tmp_path):
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


# 2 ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_results_folder_has_one_owner_at_a_time(model_dir, tmp_path):
    from thumbclf.workflows.run import prepare_output

    synth.generate(tmp_path / "many", per_class=10, seed=9, sides=(60, 120),
                   classes=("IHC", "TMA"))
    exp = write_yaml(tmp_path / "d.yaml", f"thumbData: {tmp_path / 'many'}\nmodelAdr: {model_dir}\n"
                     "hasLabels: false\nnum_workers: 0\ngradcam: 0\n")
    owner = prepare_output(tmp_path / "d", resume=False)  # another process owns the folder
    try:
        for args in ((), ("--resume",)):
            r = run_script("deploy_thumbclassifier.py", str(exp), *args)
            assert r.returncode == 2, r.stderr
            assert "another thumbclf run is using this results folder" in r.stderr
            assert f"pid {os.getpid()}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        owner.release()
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == []  # nothing was written
    r = run_script("deploy_thumbclassifier.py", str(exp))
    assert r.returncode == 0, r.stderr
    pred = pd.read_csv(tmp_path / "d" / "predictions.csv", keep_default_na=False)
    assert len(pred) == 20 and (pred["model_prediction"] != "").all()
    assert not (tmp_path / "d" / LOCK).exists()
    again = run_script("deploy_thumbclassifier.py", str(exp))  # later, without --resume
    assert again.returncode == 2 and "not empty" in again.stderr


def test_a_lock_left_by_a_crashed_run_is_reclaimed(tmp_path, caplog):
    from thumbclf.workflows.run import prepare_output

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LOCK).write_text("pid 999999 on elsewhere, started 2026-01-01")
    lock = prepare_output(tmp_path / "out", resume=True)
    assert "reclaimed the lock of an earlier run (pid 999999" in caplog.text
    lock.release()
    assert not (tmp_path / "out" / LOCK).exists()


# 3 ---------------------------------------------------------------------------------------------
def test_an_append_is_whole_or_not_at_all(tmp_path, monkeypatch):
    from thumbclf.core.errors import OutputError

    f = tmp_path / "p.csv"
    append_whole(f, b"position,A\n0,1\n")
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OutputError, match="No space left on device.*--resume"):
        append_whole(f, b"1,0.5\n2,0.25\n")
    monkeypatch.undo()
    assert f.read_bytes() == b"position,A\n0,1\n"
    with open(f, "ab") as h:  # a crash mid-write (no chance to cut back): a torn last line
        h.write(b"1,0.")
    assert repair_tail(f) == 4 and f.read_bytes() == b"position,A\n0,1\n"


@pytest.mark.slow
def test_a_full_disk_during_prediction_is_one_line_and_resumable(model_dir, tmp_path, monkeypatch,
                                                                  capsys):
    synth.generate(tmp_path / "imgs", per_class=10, seed=5, sides=(60, 120),
                   classes=("IHC", "TMA"))
    exp = write_yaml(tmp_path / "d.yaml", f"thumbData: {tmp_path / 'imgs'}\nmodelAdr: {model_dir}\n"
                     "hasLabels: false\nbatch_size: 4\nnum_workers: 0\ngradcam: 0\n")
    partial = tmp_path / "d" / "predictions.partial.csv"
    real_write, calls = os.write, []

    def fill_up(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.endswith("predictions.partial.csv"):
            calls.append(len(data))
            if len(calls) == 3:
                real_write(fd, bytes(data)[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", fill_up)
    assert main(DEPLOY, [str(exp), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" in err and "unexpected" not in err
    monkeypatch.undo()
    assert partial.read_bytes().endswith(b"\n") and len(partial.read_text().splitlines()) == 9
    with open(partial, "ab") as h:  # and a row torn by a crash
        h.write(b"290,0.1,0.9,Undeci")
    assert main(DEPLOY, [str(exp), "--quiet", "--resume"]) == 0
    pred = pd.read_csv(tmp_path / "d" / "predictions.csv", keep_default_na=False)
    assert len(pred) == 20 and pred["PATH"].is_unique and (pred["model_prediction"] != "").all()


def test_a_full_disk_before_the_first_row_still_resumes(tmp_path, monkeypatch):
    from thumbclf.workflows.stream import _done_positions
    from thumbclf.core.errors import OutputError

    partial = tmp_path / "predictions.partial.csv"

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OutputError, match="--resume"):
        append_whole(partial, b"position,A,B\n0,0.5,0.5\n")
    monkeypatch.undo()
    assert _done_positions(partial) == set() and not partial.exists()


@pytest.mark.slow
def test_a_resume_with_other_inputs_is_refused(model_dir, tmp_path, monkeypatch, capsys):
    synth.generate(tmp_path / "imgs", per_class=6, seed=5, sides=(60, 100),
                   classes=("IHC", "TMA"))
    exp = write_yaml(tmp_path / "d.yaml", f"thumbData: {tmp_path / 'imgs'}\nmodelAdr: {model_dir}\n"
                     "hasLabels: false\nbatch_size: 4\nnum_workers: 0\ngradcam: 0\n")
    import thumbclf.workflows.stream as deployment

    real = deployment.append_whole
    calls = []

    def interrupt(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, data)

    monkeypatch.setattr(deployment, "append_whole", interrupt)
    assert main(DEPLOY, [str(exp), "--quiet"]) == 130
    monkeypatch.undo()
    next((tmp_path / "imgs" / "IHC").glob("*.jpg")).unlink()  # the inputs change
    assert main(DEPLOY, [str(exp), "--quiet", "--resume"]) == 2
    assert "the inputs differ from those of the interrupted run (12 then, 11 now" in capsys.readouterr().err


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(tmp_path):
    from thumbclf.core.errors import OutputError
    from thumbclf.workflows.run import prepare_output

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LOCK).symlink_to(victim)
    with pytest.raises(OutputError, match="lock file"):
        prepare_output(tmp_path / "out", resume=True)
    assert victim.read_text() == "precious"


# 4 ---------------------------------------------------------------------------------------------
def test_a_crafted_name_collision_never_overwrites_a_sorted_copy(tmp_path):
    def make(path, data):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    x = make(tmp_path / "in" / "x" / "slide.png", b"1")
    y = make(tmp_path / "in" / "y" / "slide.png", b"22")
    tag = hashlib.sha1(str(y).encode()).hexdigest()[:8]
    z = make(tmp_path / "in" / "z" / f"slide__{tag}.png", b"333")
    w = make(tmp_path / "in" / "w" / "SLIDE.png", b"4444")
    out = tmp_path / "sorted"
    n = sort_copies([(x, "T", None), (y, "T", None), (z, "T", None), (w, "T", None)], out)
    copies = sorted(p.read_bytes() for p in (out / "T").iterdir())
    assert n == 4 and copies == [b"1", b"22", b"333", b"4444"]


# 5 ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_results_folders_inside_a_flat_input_folder_are_not_input(model_dir, tmp_path):
    flat = tmp_path / "flat"
    synth.generate(flat, per_class=2, seed=6, sides=(60, 100), classes=("IHC", "TMA"))
    counts = []
    for k in (1, 2, 3):
        exp = write_yaml(tmp_path / f"d{k}.yaml", f"thumbData: {flat}\nmodelAdr: {model_dir}\n"
                         "hasLabels: false\nsortThumbs: true\nnum_workers: 0\ngradcam: 0\n"
                         f"cache_dir: {tmp_path / 'cache'}\n")
        r = run_script("deploy_thumbclassifier.py", str(exp), "--output", str(flat / f"results{k}"))
        assert r.returncode == 0, r.stderr
        counts.append(len(pd.read_csv(flat / f"results{k}" / "predictions.csv")))
    assert counts == [4, 4, 4]
    assert "left out" in r.stderr and "results or cache folders" in r.stderr
    # a cache inside the input folder would write into the inputs: refused (issue 24), saying so
    exp.write_text(exp.read_text().replace(str(tmp_path / "cache"), str(flat / "cache")))
    r = run_script("deploy_thumbclassifier.py", str(exp), "--output", str(flat / "results4"))
    assert r.returncode == 2 and "thumbclf never writes into its inputs" in r.stderr


# 6 ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_interruption_while_sorting_is_resumed(model_dir, tiny_data, tmp_path, monkeypatch,
                                                  capsys):
    import thumbclf.outputs.sorting as sorting

    exp = write_yaml(tmp_path / "d.yaml", f"thumbData: {tiny_data}\nmodelAdr: {model_dir}\n"
                     "sortThumbs: true\nnum_workers: 0\ngradcam: 0\nbootstrap: 0\n")
    real_copy, made = sorting.copy_verified, []

    def interrupted(src, dst, **kw):
        if len(made) == 5:
            raise KeyboardInterrupt
        made.append(dst)
        return real_copy(src, dst, **kw)

    monkeypatch.setattr(sorting, "copy_verified", interrupted)
    assert main(DEPLOY, [str(exp), "--quiet"]) == 130
    assert "--resume" in capsys.readouterr().err
    monkeypatch.undo()
    out = tmp_path / "d"
    assert len(list((out / "sorted").rglob("*.jpg"))) == 5 and not (out / "report.html").exists()
    assert main(DEPLOY, [str(exp), "--resume"]) == 0
    assert "resuming after prediction" in capsys.readouterr().err
    assert len(list((out / "sorted").rglob("*.jpg"))) == 18 and (out / "report.html").is_file()
    assert main(DEPLOY, [str(exp), "--resume"]) == 2
    assert "finished already" in capsys.readouterr().err


# 7 ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bad_or_unreachable_pretrained_weights_fail_before_anything_is_written(tiny_data, tmp_path):
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


# 8 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,text,message", [
    ("a.yaml", "thumbData: x\nlr: 0.1\nseed: 2\nlr: 0.2\n", "lr: given twice (lines 2 and 4)"),
    ("a.json", '{"thumbData": "x",\n "lr": 0.1,\n "lr": 0.2}', "lr: given twice (lines 2 and 3)"),
    ("b.yaml", "thumbData: x\ntarget_labels: &a [A, B]\ncm_sortlabels: *a\n", "aliases"),
])
def test_duplicate_keys_and_yaml_aliases_are_errors(tmp_path, capsys, name, text, message):
    exp = write_yaml(tmp_path / name, text)
    assert main("train", [str(exp)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(exp) in err and len(err.strip().splitlines()) == 1


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    exp = write_yaml(tmp_path / "bomb.yaml", "\n".join(lines) + "\nthumbData: *a8\n")
    assert main("train", [str(exp)]) == 2  # refused at the first alias, never expanded
    assert "aliases" in capsys.readouterr().err


# 9 ---------------------------------------------------------------------------------------------
def _table(tmp_path, change=None):
    rng = np.random.default_rng(0)
    classes = ["Fat", "IHC", "TMA"]
    p = rng.dirichlet([1, 1, 1], 40)
    df = pd.DataFrame({"PATH": [f"{i}.png" for i in range(40)],
                       "CLASSIFICATION": np.array(classes)[rng.integers(0, 3, 40)]})
    for j, c in enumerate(classes):
        df[c] = p[:, j]
    df["model_prediction"] = decide(p, classes, 0.5)
    df["error"] = ""
    if change:
        df = change(df)
    df.to_csv(tmp_path / "predictions.csv", index=False)
    return tmp_path / "predictions.csv"


@pytest.mark.parametrize("change,message", [
    (lambda d: d.assign(Fat=["x"] + [0.1] * 39), "column Fat: 1 values are not numbers (row 2)"),
    (lambda d: d.assign(IHC=[float("nan")] * 40), "column IHC: 40 values are not numbers"),
    (lambda d: d.assign(Fat=d["Fat"] * 3, IHC=d["IHC"] * 3, TMA=d["TMA"] * 3), "outside 0-1"),
    (lambda d: d.assign(Fat=d["Fat"] / 2, IHC=d["IHC"] / 2, TMA=d["TMA"] / 2), "do not sum to 1"),
    (lambda d: d.assign(Fat=-d["Fat"]), "values lie outside 0-1"),
    (lambda d: d.drop(columns=["TMA"]), "do not sum to 1"),
])
def test_evaluate_validates_its_table(tmp_path, capsys, change, message):
    table = _table(tmp_path, change)
    assert evaluate_main([str(table), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(table) in err and "Traceback" not in err
    assert not (tmp_path / "evaluation").exists()


def test_evaluate_refuses_an_empty_file(tmp_path, capsys):
    (tmp_path / "p.csv").write_bytes(b"")
    assert evaluate_main([str(tmp_path / "p.csv")]) == 2
    assert "the file is empty" in capsys.readouterr().err


def test_evaluate_accepts_a_valid_table(tmp_path):
    assert evaluate_main([str(_table(tmp_path)), "--bootstrap", "0"]) == 0
    m = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())["all"]
    assert m["n"] == 40


# 10 --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_unusable_cache_dir_is_one_line_before_anything_is_written(tiny_data, tmp_path):
    (tmp_path / "blocker").write_text("a file, not a folder")
    exp = write_yaml(tmp_path / "e.yaml", f"thumbData: {tiny_data}\ntrainFull: true\n{FAST}"
                     f"cache: disk\ncache_dir: {tmp_path / 'blocker' / 'cache'}\n")
    r = run_script("train_thumbclassifier.py", str(exp))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot write the cache folder" in r.stderr and "blocker" in r.stderr
    assert not (tmp_path / "e").exists()


def test_result_files_are_readable_as_the_umask_says(tmp_path):
    atomic_text("x", tmp_path / "f.txt")
    mode = stat.S_IMODE((tmp_path / "f.txt").stat().st_mode)
    assert mode == FILE_MODE
    old = os.umask(0o022)
    os.umask(old)
    assert mode == 0o666 & ~old and mode & 0o044 == 0o044 & ~old


def test_error_lines_carry_no_control_characters(tmp_path, capsys):
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
