"""The training workflow's own checks, without training."""

import logging
from pathlib import Path

from thumbclf.config import TrainParams
from thumbclf.workflows.train import warn_untrained_freeze


def params(**kw) -> TrainParams:
    return TrainParams(source=Path("e.yaml"), output=Path("e"), thumb_data=Path("d"), **kw)


def test_freezing_without_pretrained_weights_warns(caplog):
    """Issue 31: an explicit freezeRatio above 0 without trained weights freezes random layers:
    the run says so; with weights, SSL or freezeRatio 0 it says nothing."""
    with caplog.at_level(logging.WARNING, logger="thumbclf.workflows.train"):
        warn_untrained_freeze(params(pretrained=False, freeze_ratio=0.5))
    assert "freezeRatio 0.50 with pretrained: false" in caplog.text
    assert "set freezeRatio: 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="thumbclf.workflows.train"):
        warn_untrained_freeze(params(pretrained=True, freeze_ratio=0.5))
        warn_untrained_freeze(params(pretrained=False, freeze_ratio=0.0))
        warn_untrained_freeze(params(pretrained=False, ssl=True, freeze_ratio=0.5))
    assert caplog.text == ""
