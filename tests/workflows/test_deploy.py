"""The deployment workflow's own checks and messages, on the shared tiny model."""

import dataclasses

from thumbclf.core import layout
from thumbclf.nn.models import load_model
from thumbclf.workflows.deploy import missing_rule_cause


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
