import math

import numpy as np
import pytest

from thumbclf.core.decide import UNDECIDED, decide, threshold_for_accuracy
from thumbclf.nn.calibration import fit_temperature
from thumbclf.nn.training import EarlyStopping, softmax, warmup_cosine


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
    cal = fit_temperature(logits, y)
    t = cal.temperature
    assert t > 2 and cal.status == "fitted"
    nll = lambda T: -np.log(softmax(logits, T)[np.arange(400), y]).mean()  # noqa: E731
    assert nll(t) < nll(1.0)
    assert np.allclose(softmax(logits, t).sum(1), 1)


def test_temperature_of_an_under_confident_model_is_not_clamped():
    # the old fit clamped T to 0.5-5; an under-confident model on 200 images wants T well below
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    logits = rng.normal(0, 1, (200, 3))
    logits[np.arange(200), y] += 1.5
    logits *= 0.1  # under-confident: probabilities near 1/3
    cal = fit_temperature(logits, y)
    assert cal.status == "fitted" and cal.temperature < 0.3
    assert "under-confident" in cal.describe()


def _tiny_problem():
    import torch
    from torch import nn

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = (rng.random((24, 8, 8, 3)) * 255).astype(np.uint8)
    x[12:, :, :, 0] = 250  # class 1: red
    y = np.array([0] * 12 + [1] * 12)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    return model, x, y


def _fit(model, x, y, epochs, checkpoints, *, resume=None, interrupt_after=None,
         lr_schedule="constant", **extra):
    import copy

    import torch
    from torch import nn

    from thumbclf.nn.data import UNNORMALISED
    from thumbclf.nn.training import FitSpec, fit

    gen = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(1)
    if resume is not None:  # as training.py does: the random generators from the checkpoint
        rng.bit_generator.state = resume["rng"]
        gen.set_state(resume["gen"])

    def batches(shuffle=True):
        order = rng.permutation(len(y)) if shuffle else np.arange(len(y))
        for i in range(0, len(y), 8):
            sel = order[i:i + 8]
            yield torch.from_numpy(x[sel]), torch.from_numpy(y[sel])

    def keep(state):
        state = copy.deepcopy(state)
        state.update(rng=rng.bit_generator.state, gen=gen.get_state())
        checkpoints.append(state)
        if len(checkpoints) == interrupt_after:
            raise KeyboardInterrupt

    spec = FitSpec(train_batches=batches, val_batches=lambda: batches(False),
                   n_train_batches=3, optimizer=torch.optim.Adam(model.parameters(), lr=0.05),
                   criterion=nn.CrossEntropyLoss(), val_criterion=nn.CrossEntropyLoss(),
                   stopper=EarlyStopping(patience=100, stop_epoch=0, max_epochs=epochs),
                   norm=UNNORMALISED, device=torch.device("cpu"), gen=gen,
                   lr_schedule=lr_schedule, **extra)
    return fit(model, spec, progress=False, on_epoch=keep, resume=resume)


def test_fit_keeps_the_features_of_the_best_epochs_own_passes():
    """The unfamiliar rule's features come from the passes training makes anyway: the best
    epoch's validation pass (the same numbers as a new pass with the kept weights) and its
    training passes (for the bank); no separate pass over the images."""
    import torch

    from thumbclf.nn.data import UNNORMALISED
    from thumbclf.nn.training import predict_logits
    from thumbclf.nn.familiarity import WithFeatures, split

    model, x, y = _tiny_problem()
    checkpoints = []
    result = _fit(model, x, y, 3, checkpoints, features_head="5", bank_size=10, seed=3)
    batches = ((torch.from_numpy(x[i:i + 8]), torch.from_numpy(y[i:i + 8]))
               for i in range(0, 24, 8))
    again, _ = predict_logits(WithFeatures(model, "5"), batches, norm=UNNORMALISED,
                              device=torch.device("cpu"))
    logits, features = split(again, 2)
    assert np.allclose(result.val_logits, logits, atol=1e-5)
    assert np.allclose(result.val_features, features, atol=1e-5)
    assert result.train_features.shape == (10, 4)  # a seeded sample of its 24 training passes
    best = checkpoints[result.best_epoch - 1]
    assert best["train_features"].shape == (10, 4) and best["val_features"].shape == (24, 4)
    resumed_model, _, _ = _tiny_problem()
    resumed = _fit(resumed_model, x, y, 3, [], resume=checkpoints[-1], features_head="5")
    assert np.allclose(resumed.val_features, result.val_features, atol=1e-2)  # kept as float16
    plain = _fit(_tiny_problem()[0], x, y, 1, [])
    assert plain.val_features is None and plain.train_features is None  # rule off: nothing kept


def test_fit_resumed_at_an_epoch_gives_the_same_weights_as_not_stopping():
    import torch

    model, x, y = _tiny_problem()
    straight = _fit(model, x, y, 4, [])
    final = model.state_dict()
    checkpoints = []
    interrupted, _, _ = _tiny_problem()
    with pytest.raises(KeyboardInterrupt):  # stopped after epoch 2
        _fit(interrupted, x, y, 4, checkpoints, interrupt_after=2)
    resumed_model, _, _ = _tiny_problem()  # a new process: weights come from the checkpoint
    torch.manual_seed(123)  # whatever the global generator did meanwhile
    resumed = _fit(resumed_model, x, y, 4, [], resume=checkpoints[-1])
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert all(torch.equal(final[k], v) for k, v in resumed_model.state_dict().items())
    assert resumed.best_epoch == straight.best_epoch


def test_cosine_schedule_resumes_from_a_weights_only_checkpoint_to_the_same_weights(tmp_path):
    import torch

    model, x, y = _tiny_problem()
    straight = _fit(model, x, y, 4, [], lr_schedule="cosine")
    final = model.state_dict()
    lrs = [h["lr"] for h in straight.history]  # after each epoch: the peak, then down to 0
    assert lrs[0] == pytest.approx(0.05) and lrs[1] < 0.05 and lrs[-1] < 1e-9
    checkpoints = []
    interrupted, _, _ = _tiny_problem()
    with pytest.raises(KeyboardInterrupt):
        _fit(interrupted, x, y, 4, checkpoints, interrupt_after=2, lr_schedule="cosine")
    saved = {k: v for k, v in checkpoints[-1].items() if k not in ("rng", "gen")}
    torch.save(saved, tmp_path / "checkpoint.pt")  # as training.py writes and reads it
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state.update(rng=checkpoints[-1]["rng"], gen=checkpoints[-1]["gen"])
    resumed_model, _, _ = _tiny_problem()
    _fit(resumed_model, x, y, 4, [], resume=state, lr_schedule="cosine")
    assert all(torch.equal(final[k], v) for k, v in resumed_model.state_dict().items())


def test_batchnorm_statistics_are_re_estimated_with_the_final_weights():
    import torch

    from thumbclf.nn.data import UNNORMALISED
    from thumbclf.nn.training import recalibrate_bn

    model, x, y = _tiny_problem()
    bn = model[1]
    bn.running_mean.fill_(100.0)  # stale statistics, as after weights changed fast
    model.train()
    batches = [(torch.from_numpy(x[:12]), None), (torch.from_numpy(x[12:]), None)]
    recalibrate_bn(model, batches, norm=UNNORMALISED, device=torch.device("cpu"))
    with torch.no_grad():
        feats = model[0](torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    assert torch.allclose(bn.running_mean, feats.mean(dim=(0, 2, 3)), atol=1e-4)
    assert bn.momentum == 0.1  # restored
    frozen_model, _, _ = _tiny_problem()
    frozen_model.eval()  # frozen (eval-mode) BatchNorm is left alone
    before = frozen_model[1].running_mean.clone()
    recalibrate_bn(frozen_model, batches, norm=UNNORMALISED, device=torch.device("cpu"))
    assert torch.equal(frozen_model[1].running_mean, before)


def test_one_rule_decides_the_threshold_in_force():
    from thumbclf.core.decide import threshold_in_force

    assert threshold_in_force().value == 0.9
    assert threshold_in_force(given=0.7, stored=[0.8]).reason.startswith("prediction_threshold")
    assert threshold_in_force(stored=[0.6, None, 0.8, 0.7]).value == 0.7
    assert threshold_in_force(table=[0.5, 0.5]).value == 0.5
    assert threshold_in_force(default=None).value is None
    probs = np.array([[0.99, 0.01], [0.8, 0.2], [0.6, 0.4]])
    chosen = threshold_in_force(given=0.5, target_accuracy=1.0, val_probs=probs,
                                val_y=np.array([0, 0, 1]))
    assert chosen.value == 0.8 and "target_accuracy" in chosen.reason


def test_warmup_cosine_schedule_peaks_at_lr_and_ends_at_zero():
    """Issue 15, trustworthy Undecided."""
    f = warmup_cosine(10, 5)
    assert f(0) == pytest.approx(0.1) and f(10) == pytest.approx(1.0)
    assert f(30) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(50) == pytest.approx(0.0, abs=1e-12) and f(60) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(10, 50))
