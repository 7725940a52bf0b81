"""predict/local.py: this machine's executor: folds one after another, decoding workers."""

from thumbclf.core import machine
from thumbclf.predict.executor import ExecutorSpec
from thumbclf.predict.local import LocalExecutor, decode_workers


def test_folds_run_in_order_with_what_they_share():
    ex = LocalExecutor(ExecutorSpec())
    got = list(ex.run_folds(lambda fold, device, scale: (fold * scale, device), [1, 2, 3],
                            {"scale": 10}, device="cpu"))
    assert got == [(10, "cpu"), (20, "cpu"), (30, "cpu")]


def test_decoding_workers_leave_the_model_a_core(monkeypatch):
    assert decode_workers(0) == 0 and decode_workers(3) == 3
    for cores, workers in ((1, 1), (2, 1), (8, 7), (64, 16)):
        monkeypatch.setattr(machine, "cores", lambda c=cores: c)
        assert decode_workers(-1) == workers
