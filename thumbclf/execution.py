"""Where the work runs: this machine (the default) or a Ray cluster, chosen here and only here.

An executor does two jobs for the workflows, which read the same whatever runs them:

- ``predict(...)``: batches of (sample positions, probabilities, unfamiliarity, error messages)
  for the images
  to predict, in any order; deployment appends them to its partial file (resume, flat memory).
- ``run_folds(fn, folds, shared)``: ``fn(fold=k, device=..., **shared)`` for every fold, in
  fold order of the results.

``executor: local`` runs in this process with decoding worker processes, as before. ``executor:
ray`` lives in ray_backend.py, the only module that imports Ray; it is imported only when chosen.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from . import machine

log = logging.getLogger(__name__)
# positions, probabilities (n, classes), unfamiliarity (n; None without the rule), errors
Batch = tuple[np.ndarray, np.ndarray, "np.ndarray | None", list[str]]
RAY_INSTALL = 'pip install "thumbclf[ray]"'


class LocalExecutor:
    """This process: a DataLoader's worker processes decode while the model predicts; folds
    one after another."""

    name = "local"

    def __init__(self, params):
        self.params = params

    def predict(self, models, positions: list[int], paths: list[Path], *, device,
                slide_cache: Path | None, runners=None) -> Iterator[Batch]:
        import torch

        from .data import stream_loader
        from .deployment import ensemble_predict, exact_runners

        params = self.params
        workers = decode_workers(params.num_workers)
        batch = params.batch_size * (4 if device.type == "cuda" else 1)  # no gradients to store
        loader = stream_loader(paths, models[0].prep, batch_size=batch, workers=workers,
                               pin_memory=device.type == "cuda", slide_cache=slide_cache)
        runners = runners or exact_runners(models, device)
        todo = np.asarray(positions)
        for pos, x, errors in loader:
            with torch.inference_mode():
                probs, unfamiliarity = ensemble_predict(models, runners, x, device, params.tta)
            yield todo[pos.numpy()], probs, unfamiliarity, list(errors)

    def run_folds(self, fn: Callable, folds: list[int], shared: dict[str, Any], *,
                  device) -> Iterator:
        for fold in folds:
            yield fn(fold=fold, device=device, **shared)

    def describe(self) -> dict:
        return {"executor": self.name, "workers": decode_workers(self.params.num_workers)}


def decode_workers(requested: int) -> int:
    """Decoding processes next to the model: num_workers, or (-1) all cores but the model's one."""
    return requested if requested >= 0 else min(16, max(1, machine.cores() - 1))


@contextlib.contextmanager
def executor_for(params, *, quiet: bool = False) -> Iterator[LocalExecutor]:
    """The executor the params ask for (``executor`` key), released when the block ends."""
    if getattr(params, "executor", "local") != "ray":
        yield LocalExecutor(params)
        return
    from .ray_backend import RayExecutor  # the only import of the Ray backend

    ex = RayExecutor(params, quiet=quiet)
    try:
        yield ex
    finally:
        ex.close()
