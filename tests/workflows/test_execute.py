"""workflows/execute.py: what a run sets up before its workflow."""

from __future__ import annotations

import os

import pytest

from thumbclf.config import DEPLOY
from thumbclf.config.files import load_experiment
from thumbclf.core.errors import ThumbclfError
from thumbclf.workflows.execute import execute


def test_a_deploy_sets_an_omp_wait_policy_every_locale_accepts(tmp_path, monkeypatch):
    """Issue 33, item 20: under a Turkish locale libgomp rejected OMP_WAIT_POLICY=PASSIVE (its
    case-insensitive compare folds "I" to a dotless "ı"); lower case is read in every locale."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    (tmp_path / "data").mkdir()
    params, _ = load_experiment({"thumbData": str(tmp_path / "data"),
                                 "modelAdr": str(tmp_path / "missing.pt")},
                                workflow=DEPLOY, output=tmp_path / "out")
    with pytest.raises(ThumbclfError):  # stops at its missing model, after the setting
        execute(params, quiet=True)
    assert os.environ["OMP_WAIT_POLICY"] == "passive"


@pytest.mark.parametrize("workflow, keys, then", [
    (DEPLOY, {"modelAdr": "m.pt"}, "run deploy as one process (or with executor: ray for many "
     "machines)"),
    ("pretrain", {}, "run pretrain as one process")])
def test_torchrun_refuses_what_it_does_not_train_before_the_workflow_loads(
        tmp_path, monkeypatch, workflow, keys, then):
    """A pretraining under torchrun was told to "run deploy as one process"; and each rank
    imported the whole deploy before its refusal (seconds of CPU per rank)."""
    import sys

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for name in ("thumbclf.workflows.deploy", "thumbclf.workflows.pretrain"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    (tmp_path / "data").mkdir()
    params, _ = load_experiment({"thumbData": str(tmp_path / "data"), **keys},
                                workflow=workflow, output=tmp_path / "out")
    with pytest.raises(ThumbclfError) as err:
        execute(params, quiet=True)
    assert str(err.value).endswith(f"torchrun trains one model on several GPUs/processes; {then}")
    assert f"thumbclf.workflows.{workflow}" not in sys.modules
    assert not (tmp_path / "out").exists()
