"""The deployment workflow's own checks and messages, on the shared tiny model."""

import dataclasses
import errno
import os

import pandas as pd
import pytest
import torch

from conftest import HOSTILE, deploy, messy_table, model_file, odd_names, run_script, write_yaml
from thumbclf.cli import main
from thumbclf.config import DEPLOY
from thumbclf.core import layout
from thumbclf.inputs import synth
from thumbclf.nn.models import load_model
from thumbclf.workflows.deploy import adapt_advice, judge_sources, missing_rule_cause


def test_a_model_without_the_unfamiliar_rule_is_told_why(tiny_model):
    """Issue 31: the warning names the one cause the model file shows, not three guesses."""
    loaded = load_model(layout.model_files_in(tiny_model)[0])
    assert loaded.familiarity is None  # a handful of validation images: no rule
    assert "validation split had fewer than 20 images" in missing_rule_cause(loaded)
    off = dataclasses.replace(loaded, meta={**loaded.meta, "params": {
        **loaded.meta["params"], "unfamiliar": False}})
    assert missing_rule_cause(off) == "trained with unfamiliar: false"
    old = dataclasses.replace(loaded, calibration={})
    assert missing_rule_cause(old) == "written by the prototype or before thumbclf 1.1"


def test_resume_refuses_a_changed_model_file(tiny_data, tmp_path, capsys):
    """Issue 24, item 2: a resume never mixes two models."""
    model = model_file(tmp_path / "model.pt", seed=0)
    assert deploy(tmp_path, tiny_data, model) == 0
    (tmp_path / "dep" / "report.html").unlink()  # as if interrupted before its last step
    model_file(model, seed=1)  # another model, same path
    assert deploy(tmp_path, tiny_data, model, "--resume") == 2
    err = capsys.readouterr().err
    assert "model.pt: the model files differ from those the interrupted run predicted with" in err
    model_file(model, seed=0)  # restored: the resume goes on
    assert deploy(tmp_path, tiny_data, model, "--resume") == 0


def test_a_locked_or_unfinished_training_folder_is_refused(tiny_data, tmp_path, capsys):
    """Issue 24, item 3: a training folder that did not finish is refused."""
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


def test_a_deploy_writes_no_formula_into_any_table(tmp_path):
    """Issue 24, item 5: no table runs formulas in a spreadsheet."""
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


def test_a_name_that_is_not_utf8_or_too_long_gets_its_row(tmp_path):
    """Issue 24, item 8: names that are not text, names too long."""
    import pandas as pd

    from thumbclf.core import table

    data, odd = odd_names(tmp_path)
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


def test_deploy_labels_that_differ_only_in_case_are_refused(tiny_data, tmp_path, capsys):
    """Issue 24, item 10: labels that differ from the model's classes only by case."""
    import pandas as pd

    df = pd.read_csv(tiny_data)
    df["CLASSIFICATION"] = df["CLASSIFICATION"].replace({"IHC": "ihc"})
    df["PATH"] = [str(tiny_data.parent / p) for p in df["PATH"]]
    df.to_csv(tmp_path / "labels.csv", index=False)
    model = model_file(tmp_path / "model.pt")
    assert deploy(tmp_path, tmp_path / "labels.csv", model) == 2
    assert "labels differ from the model's classes only in upper/lower case: 'ihc' (the model's 'IHC')" in capsys.readouterr().err


def test_a_fifo_listed_in_a_table_is_an_error_row(tiny_data, tmp_path):
    """Issue 24, item 12: runs that never end."""
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


def test_rows_are_counted_by_what_happened_not_by_the_words_of_their_error(tiny_data, tmp_path):
    """Issue 32, item 2: the report counted rows by matching words of the error message, so a
    corrupt file named "file not found.png" was counted as not found, and rewording a message
    moved rows; each row now carries its error's kind (error_kind)."""
    from thumbclf.core import table
    from thumbclf.outputs import tally

    (tmp_path / "in").mkdir()
    for name in ("file not found.png", "too large is missing.png"):
        (tmp_path / "in" / name).write_bytes(b"not an image")
    paths = [str(tiny_data.parent / p) for p in pd.read_csv(tiny_data)["PATH"][:2]]
    listed = [*paths, *(str(p) for p in sorted((tmp_path / "in").iterdir())),
              str(tmp_path / "in" / "gone.png")]
    pd.DataFrame({"PATH": listed}).to_csv(tmp_path / "t.csv", index=False)
    model = model_file(tmp_path / "model.pt")
    assert deploy(tmp_path, tmp_path / "t.csv", model, text="hasLabels: false\n") == 0
    back = table.read_csv(tmp_path / "dep" / "predictions.csv")
    assert back[table.ERROR_KIND].tolist() == ["", "", "unreadable", "unreadable", "not found"]
    counts = tally.counts(back)
    assert counts["unreadable"] == 2 and counts["not found"] == 1 and "too large" not in counts
    assert "<td>unreadable</td><td>2</td>" in (tmp_path / "dep" / "report.html").read_text()


def test_adapt_bn_needs_enough_deploy_images(tiny_data, tmp_path, capsys):
    """Issue 24, item 14: adapt_bn on a handful of images."""
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


def test_a_cache_folder_in_the_input_folder_is_refused_before_anything_is_written(tmp_path, capsys):
    """Issue 24, hostile inputs."""
    from thumbclf.inputs import synth

    data = tmp_path / "data"
    synth.generate(data, per_class=2, seed=1, sides=(40, 60), classes=("IHC", "TMA"))
    before = sorted(p.name for p in data.rglob("*"))
    model = model_file(tmp_path / "model.pt", classes=("IHC", "TMA"))
    (tmp_path / "dep.yaml").write_text(f"thumbData: {data}\nmodelAdr: {model}\ncache_dir: {data}\n")
    assert deploy(tmp_path, data, model) == 2
    assert f"cache_dir {data} is the input folder (thumbData: {data})" in capsys.readouterr().err
    assert sorted(p.name for p in data.rglob("*")) == before


def test_a_model_whose_outputs_are_not_finite_is_an_error(tiny_data, tmp_path, capsys):
    """Issue 24, hostile inputs."""
    model = model_file(tmp_path / "model.pt")
    obj = torch.load(model, weights_only=True)
    obj["state_dict"]["fc.weight"] = torch.full_like(obj["state_dict"]["fc.weight"], 3e38)
    torch.save(obj, model)  # finite weights whose logits overflow to infinity
    assert deploy(tmp_path, tiny_data, model) == 2
    err = capsys.readouterr().err
    assert "model.pt: computed outputs that are not finite (NaN or infinity)" in err
    assert not (tmp_path / "dep" / "predictions.csv").exists()


@pytest.mark.slow
def test_a_full_disk_during_prediction_is_one_line_and_resumable(model_dir, tmp_path, monkeypatch,
                                                                  capsys):
    """Issue 10, item 3: nothing lost."""
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


@pytest.mark.slow
def test_a_resume_with_other_inputs_is_refused(model_dir, tmp_path, monkeypatch, capsys):
    """Issue 10, item 3: nothing lost."""
    synth.generate(tmp_path / "imgs", per_class=6, seed=5, sides=(60, 100),
                   classes=("IHC", "TMA"))
    exp = write_yaml(tmp_path / "d.yaml", f"thumbData: {tmp_path / 'imgs'}\nmodelAdr: {model_dir}\n"
                     "hasLabels: false\nbatch_size: 4\nnum_workers: 0\ngradcam: 0\n")
    import thumbclf.predict.stream as deployment

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


@pytest.mark.slow
def test_results_folders_inside_a_flat_input_folder_are_not_input(model_dir, tmp_path):
    """Issue 10, item 5: nothing lost."""
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


@pytest.mark.slow
def test_an_interruption_while_sorting_is_resumed(model_dir, tiny_data, tmp_path, monkeypatch,
                                                  capsys):
    """Issue 10, item 6: nothing lost."""
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


@pytest.mark.slow
def test_deploy_keeps_unreadable_rows_with_the_reason_and_finishes(model_dir, tiny_data, tmp_path):
    """Issue 5, messy archives."""
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
    kinds = dict(zip(bad["PATH"].str.rsplit("/", n=1).str[-1], bad["error_kind"]))  # issue 32
    assert kinds.pop("missing.jpg") == "not found" and set(kinds.values()) == {"unreadable"}
    assert list(bad["row"]) == [20, 21, 22, 23, 24]  # table row numbers
    assert "5 unreadable" in r.stderr
    assert len(list((tmp_path / "dep" / "sorted").rglob("*.jpg"))) == 18


def test_a_deploy_adapted_to_one_slide_type_is_told_how_to_tell(tmp_path, caplog):
    """Issue 28: BatchNorm adaptation to a deploy of one slide type (label shift) makes most
    slides unfamiliar, as another world does (bench/realworld.py: 60 Resection slides, all
    decided without adapt_bn, all Undecided with it); the warning says so where adapt_bn was
    on, and only there."""
    rows = 40
    table = pd.DataFrame({
        "PATH": [f"s{i}.jpg" for i in range(rows)],
        "model_prediction": ["Undecided"] * 30 + ["Fat"] * 10,
        "undecided_reason": ["unfamiliar"] * 30 + [""] * 10,
        "unfamiliarity": [2.0] * 30 + [0.5] * 10})
    for adapted in (False, True):
        caplog.clear()
        with caplog.at_level("WARNING", logger="thumbclf"):
            out = judge_sources(table, tmp_path / f"p{adapted}.csv", 0.5, adapted=adapted)
        assert (out["undecided_reason"] == "unfamiliar source").sum() == 10
        assert ("adapt_bn: false" in caplog.text) == adapted


def test_a_deploy_that_looks_unlike_the_training_slides_is_advised_to_adapt(tmp_path):
    """Issue 28: where a whole deploy looks unlike the training slides and adapt_bn was off, the
    run advises it (bench/realworld.py); not where adapt_bn was on or could change nothing
    (no BatchNorm), nor for a deploy too small to adapt or a few percent beyond, as the
    validation's 99th percentile of a few dozen images lets ordinary slides be."""
    def table(rows: int, beyond: int) -> pd.DataFrame:
        return pd.DataFrame({"undecided_reason": [""] * rows, "unfamiliarity_look":
                             [0.9] * beyond + [0.3] * (rows - beyond)})

    advice = adapt_advice(table(100, 40), adapted=False)
    assert advice and "40 of its 100 slides" in advice and "adapt_bn: true" in advice
    assert adapt_advice(table(100, 40), adapted=True) is None
    assert adapt_advice(table(100, 40), adapted=False, adaptable=False) is None  # no BatchNorm
    assert adapt_advice(table(100, 4), adapted=False) is None  # as ordinary slides may
    assert adapt_advice(table(20, 15), adapted=False) is None  # fewer than adapt_bn needs
    assert adapt_advice(table(100, 40).drop(columns="unfamiliarity_look"), adapted=False) is None
