"""nn/calibration.py: temperature scaling fitted on the validation split."""

import logging

import numpy as np

from thumbclf.nn.calibration import fit_temperature


def test_temperature_is_left_alone_on_tiny_splits_and_finite_on_separable_ones(caplog):
    y = np.arange(12) % 3
    logits = np.eye(3)[y] * 4.0
    with caplog.at_level(logging.INFO, logger="thumbclf.nn.calibration"):
        tiny = fit_temperature(logits, y)
    assert "skipped" not in caplog.text  # issue 31: said once, by the fold's line (describe)
    assert tiny.temperature == 1.0 and tiny.status == "skipped"  # 12 images: too few
    assert "skipped" in tiny.describe() and "12" in tiny.describe()
    y = np.arange(60) % 3
    sep = fit_temperature(np.eye(3)[y] * 4.0, y)  # all correct: the likelihood alone -> T = 0
    assert sep.status == "separable" and 0.05 < sep.temperature < 1.0
    assert "prior" in sep.describe()
