"""predict/execution.py: the executor is chosen here, and only here."""

from thumbclf.predict.execution import executor_for
from thumbclf.predict.executor import ExecutorSpec
from thumbclf.predict.local import LocalExecutor


def test_the_default_runs_here():
    spec = ExecutorSpec(num_workers=0)
    with executor_for(spec) as ex:
        assert isinstance(ex, LocalExecutor) and ex.spec is spec
        assert ex.describe() == {"executor": "local", "workers": 0}
