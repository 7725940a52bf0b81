"""inputs/synth.py: the generated thumbnails the tests and the demo use."""

import numpy as np

from thumbclf.inputs import synth


def test_other_lab_shift_of_the_synthetic_generator():
    """Issue 15, trustworthy Undecided."""
    img = synth.draw_slide("Resection", 120, 90, np.random.default_rng(0))
    assert synth.other_lab(img, 0.0, np.random.default_rng(1)) is img
    shifted = synth.other_lab(img, 1.0, np.random.default_rng(1))
    a, b = np.asarray(img, float), np.asarray(shifted, float)
    assert shifted.size == img.size and np.abs(a - b).mean() > 5
    assert b[:5, :5, 2].mean() < a[:5, :5, 2].mean() - 10  # yellowish glass: less blue
