"""config/rules.py: every problem of an experiment file at once, one line each, naming the file."""

from pathlib import Path

import pytest

from thumbclf.config import TRAIN
from thumbclf.config.rules import validate
from thumbclf.core.errors import ConfigError


def test_every_problem_of_a_file_is_reported_at_once(tmp_path):
    source = tmp_path / "e.yaml"
    raw = {"thumbData": "x", "freezeRatio": 1.5, "lr": "fast", "augment": "yes", "foldNumbr": 3}
    with pytest.raises(ConfigError) as err:
        validate(raw, workflow=TRAIN, source=source)
    problems = err.value.problems
    assert len(problems) == 4 and all(p.startswith(f"{source}: ") for p in problems)
    assert f"{source}: freezeRatio must be between 0 and 1; got 1.5" in problems
    assert f"{source}: lr must be a number; got 'fast'" in problems
    assert f"{source}: foldNumbr: unknown key; did you mean 'foldNumber'?" in problems
    assert any("augment must be true or false" in p for p in problems)


def test_values_are_converted_as_the_prototype_wrote_them(tmp_path):
    params = validate({"thumbData": "data", "freezeRatio": "0.5", "augment": 1},
                      workflow=TRAIN, source=tmp_path / "exp" / "e.yaml")
    assert params.thumb_data == tmp_path / "exp" / "data"  # relative to the file's folder
    assert params.freeze_ratio == 0.5 and params.augment is True


def test_both_spellings_of_one_key_are_an_error(tmp_path):
    with pytest.raises(ConfigError, match="foldNumber"):
        validate({"thumbData": "x", "foldNumber": 3, "fold_number": 3}, workflow=TRAIN,
                 source=Path("e.yaml"))
