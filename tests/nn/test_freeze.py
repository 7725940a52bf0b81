"""freezeRatio's warning when there are no trained weights to keep."""

import logging

from thumbclf.nn.freeze import warn_untrained


def test_freezing_without_pretrained_weights_warns(caplog):
    """Issue 31: an explicit freezeRatio above 0 without trained weights freezes random layers:
    the run says so; with weights (or SSL) or freezeRatio 0 it says nothing."""
    with caplog.at_level(logging.WARNING, logger="thumbclf.nn.freeze"):
        warn_untrained(0.5, trained=False)
    assert "freezeRatio 0.50 with pretrained: false" in caplog.text
    assert "set freezeRatio: 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="thumbclf.nn.freeze"):
        warn_untrained(0.5, trained=True)
        warn_untrained(0.0, trained=False)
    assert caplog.text == ""
