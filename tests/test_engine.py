import numpy as np
import pytest

from thumbclf.decide import UNDECIDED, decide, threshold_for_accuracy
from thumbclf.engine import EarlyStopping, fit_temperature, softmax


def run(stopper, losses):
    seen = []
    for loss in losses:
        if stopper.should_stop:
            break
        stopper.step(loss)
        seen.append(stopper.epoch)
    return seen


def test_early_stopping_waits_for_patience_after_stop_epoch():
    s = EarlyStopping(patience=2, stop_epoch=0, max_epochs=100)
    assert run(s, [5, 4, 4.5, 4.6, 1, 1]) == [1, 2, 3, 4]
    assert s.best_epoch == 2


def test_early_stopping_never_before_stop_epoch_nor_after_max_epochs():
    s = EarlyStopping(patience=1, stop_epoch=5, max_epochs=100)
    assert run(s, [1, 2, 3, 4, 5, 6, 7]) == [1, 2, 3, 4, 5]
    s = EarlyStopping(patience=10, stop_epoch=0, max_epochs=3)
    assert run(s, [5, 4, 3, 2, 1]) == [1, 2, 3]


def test_undecided_below_the_threshold():
    p = np.array([[0.95, 0.05], [0.6, 0.4], [0.1, 0.9]])
    assert decide(p, ("A", "B"), 0.9) == ["A", UNDECIDED, "B"]
    assert decide(p, ("A", "B"), 0.0) == ["A", "A", "B"]
    assert decide(p, ("A", "B"), 0.6) == ["A", "A", "B"]  # equal to the threshold decides
    with pytest.raises(ValueError):
        decide(p, ("A", "B", "C"), 0.5)


def test_threshold_for_accuracy():
    p = np.array([[0.99, 0.01], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    y = np.array([0, 0, 1, 0])  # the 0.8 case is wrong
    assert threshold_for_accuracy(p, y, 1.0) == 0.9
    assert threshold_for_accuracy(p, y, 0.75) == 0.7
    assert threshold_for_accuracy(np.array([[0.9, 0.1]]), np.array([1]), 0.5) is None


def test_temperature_scaling_softens_overconfident_logits():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    logits = rng.normal(0, 1, (400, 3))
    logits[np.arange(400), y] += 1.0
    logits *= 8  # overconfident
    t = fit_temperature(logits, y)
    assert t > 2
    nll = lambda T: -np.log(softmax(logits, T)[np.arange(400), y]).mean()  # noqa: E731
    assert nll(t) < nll(1.0)
    assert np.allclose(softmax(logits, t).sum(1), 1)


def test_temperature_is_left_alone_on_tiny_splits_and_bounded_on_separable_ones():
    y = np.arange(12) % 3
    logits = np.eye(3)[y] * 4.0
    assert fit_temperature(logits, y) == 1.0  # 12 images: too few
    y = np.arange(60) % 3
    assert fit_temperature(np.eye(3)[y] * 4.0, y) == 0.5  # all correct: NLL falls as T -> 0
