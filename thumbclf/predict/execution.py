"""Where the work runs: this machine (the default) or a Ray cluster, chosen here and only here.

An executor does two jobs for the workflows, which read the same whatever runs them:

- ``predict(...)``: batches of (sample positions, probabilities, the decision step's other
  inputs by table column (local.Batch), error messages) for the images to predict, in any
  order; deployment appends them to its partial file (resume, flat memory).
- ``run_folds(fn, folds, shared)``: ``fn(fold=k, device=..., **shared)`` for every fold, in
  fold order of the results.

``executor: local`` runs in this process with decoding worker processes, as before. ``executor:
ray`` lives in ray_backend.py, the only module that imports Ray; it is imported only when chosen.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from thumbclf.predict.executor import Executor, ExecutorSpec
from thumbclf.predict.local import LocalExecutor

log = logging.getLogger(__name__)


@contextlib.contextmanager
def executor_for(spec: ExecutorSpec, *, progress: bool = True) -> Iterator[Executor]:
    """The executor ``spec`` asks for (``executor`` key), released when the block ends."""
    if spec.executor != "ray":
        yield LocalExecutor(spec)
        return
    from thumbclf.predict.ray_backend import RayExecutor, ray_lines_to_run_log

    # no progress bars: the console is whole lines, and Ray's own go to run.log
    with ray_lines_to_run_log() if not progress else contextlib.nullcontext():
        ex = RayExecutor(spec, progress=progress)
        try:
            yield ex
        finally:
            ex.close()
