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
