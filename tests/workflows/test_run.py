"""workflows/run.py: the run's folders are checked before anything is written."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from conftest import TINY_TRAIN, run_script, write_yaml
from thumbclf.config import TRAIN
from thumbclf.config.files import load_experiment
from thumbclf.core.errors import ConfigError, OutputError
from thumbclf.core.layout import LOCK
from thumbclf.inputs import synth
from thumbclf.workflows.run import check_cache_apart, prepare_output

FAST = TINY_TRAIN  # the one fast settings block (conftest)


def test_a_cache_folder_among_a_tables_images_is_refused(tmp_path):
    """Issue 33, item 11: a cache folder inside the folders a table's images live in was
    accepted, and matplotlib's cache was written there. Item 20: a results folder inside the
    input folder was refused with a message about cache_dir, which the user never set."""
    table = synth.generate(tmp_path / "data", per_class=2, seed=1, sides=(40, 60),
                           classes=("IHC", "TMA"))
    images = tmp_path / "data" / "IHC"
    params, _ = load_experiment({"thumbData": str(table), "cache_dir": str(images / "cache")},
                                workflow=TRAIN, output=tmp_path / "out")
    with pytest.raises(ConfigError, match=r"cache_dir .*IHC.cache is in .*IHC, a folder of the "
                                          r"table's images .*choose a cache_dir outside it"):
        check_cache_apart(params)
    params, _ = load_experiment({"thumbData": str(tmp_path / "data")}, workflow=TRAIN,
                                output=tmp_path / "data" / "results")
    with pytest.raises(ConfigError, match=r"the results folder is inside the input folder .*"
                                          r"choose an --output outside it") as caught:
        check_cache_apart(params)
    assert "cache_dir" not in str(caught.value)
    fine, _ = load_experiment({"thumbData": str(table)}, workflow=TRAIN, output=tmp_path / "out")
    check_cache_apart(fine)  # beside the data, not inside an image folder: accepted


@pytest.mark.slow
def test_a_results_folder_has_one_owner_at_a_time(model_dir, tmp_path):
    """Issue 10, item 2: nothing lost."""
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
    """Issue 10, item 2: nothing lost."""
    from thumbclf.workflows.run import prepare_output

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LOCK).write_text("pid 999999 on elsewhere, started 2026-01-01")
    lock = prepare_output(tmp_path / "out", resume=True)
    assert "reclaimed the lock of an earlier run (pid 999999" in caplog.text
    lock.release()
    assert not (tmp_path / "out" / LOCK).exists()


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(tmp_path):
    """Issue 10, item 3: nothing lost."""
    from thumbclf.core.errors import OutputError
    from thumbclf.workflows.run import prepare_output

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LOCK).symlink_to(victim)
    with pytest.raises(OutputError, match="lock file"):
        prepare_output(tmp_path / "out", resume=True)
    assert victim.read_text() == "precious"


def test_results_folder_that_cannot_be_created_is_a_clear_error(tmp_path):
    """Issue 5, messy archives."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        prepare_output(tmp_path / "file", resume=False)
    with pytest.raises(OutputError, match="cannot write the results folder"):
        prepare_output(tmp_path / "file" / "sub", resume=False)
    with pytest.raises(OutputError, match="nothing to resume"):
        prepare_output(tmp_path / "new", resume=True)


@pytest.mark.slow
def test_a_run_that_failed_before_any_result_can_simply_be_run_again(tmp_path, tiny_data):
    """Issue 5, messy archives."""
    exp = write_yaml(tmp_path / "e.yaml", f"thumbData: {tiny_data}\n{FAST}foldNumber: 10\n")
    r = run_script("train_thumbclassifier.py", str(exp))
    assert r.returncode == 2 and "fewer than the 10 needed" in r.stderr
    assert (tmp_path / "e" / "run.log").is_file()
    exp.write_text(exp.read_text().replace("foldNumber: 10", "foldNumber: 2"))
    r = run_script("train_thumbclassifier.py", str(exp))
    assert r.returncode == 0, r.stderr
    assert "fewer than the 10 needed" in (tmp_path / "e" / "run.log").read_text()  # log kept
