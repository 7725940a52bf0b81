"""predict/executor.py: what an executor is; the local one keeps its protocol."""

import dataclasses

import pytest

from thumbclf.predict.executor import Executor, ExecutorSpec
from thumbclf.predict.local import LocalExecutor


def test_the_spec_is_frozen_with_the_defaults_of_a_local_run():
    spec = ExecutorSpec()
    assert (spec.executor, spec.num_workers, spec.ray_address) == ("local", -1, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.batch_size = 1


def test_the_local_executor_has_every_member_of_the_protocol():
    members = {n for n in vars(Executor) if not n.startswith("_")} | set(
        Executor.__annotations__)
    assert members == {"name", "spec", "predict", "run_folds", "describe"}
    ex = LocalExecutor(ExecutorSpec(num_workers=2))
    assert all(hasattr(ex, m) for m in members) and ex.spec.num_workers == 2
