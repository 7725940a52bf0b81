"""The local executor: this process predicts while a DataLoader's worker processes decode; folds
run one after another."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from thumbclf.core import machine
from thumbclf.predict.executor import Batch, ExecutorSpec

log = logging.getLogger(__name__)


RAY_INSTALL = 'pip install "thumbclf[ray]"'


class LocalExecutor:
    """This process: a DataLoader's worker processes decode while the model predicts; folds
    one after another."""

    name = "local"

    def __init__(self, spec: ExecutorSpec):
        self.spec = spec

    def decoded(self, models, positions: list[int], paths: list[Path], *, device,
                slide_cache: Path | None) -> Iterator[tuple[np.ndarray, Any, list[str], Any]]:
        """The stream's decoded batches, (positions, uint8 images, errors, look measures): the
        workers decode (and measure the looks) ahead of whatever computes them (up to their
        prefetch), the model's verification included."""
        from thumbclf.nn.data import stream_loader

        spec = self.spec
        batch = spec.batch_size * (4 if device.type == "cuda" else 1)  # no gradients to store
        loader = stream_loader(paths, models[0].prep, batch_size=batch,
                               workers=decode_workers(spec.num_workers),
                               pin_memory=device.type == "cuda", slide_cache=slide_cache,
                               looks=True)
        todo = np.asarray(positions)
        for pos, x, errors, looks in loader:
            yield todo[pos.numpy()], x, list(errors), looks

    def predict(self, models, positions: list[int], paths: list[Path], *, device,
                slide_cache: Path | None, runners=None) -> Iterator[Batch]:
        from thumbclf.predict.ensemble import exact_runners

        runners = runners or exact_runners(models, device)
        yield from computed(models, runners, self.decoded(models, positions, paths, device=device,
                                                          slide_cache=slide_cache),
                            device, self.spec.tta)

    def run_folds(self, fn: Callable, folds: list[int], shared: dict[str, Any], *,
                  device) -> Iterator:
        for fold in folds:
            yield fn(fold=fold, device=device, **shared)

    def describe(self) -> dict:
        return {"executor": self.name, "workers": decode_workers(self.spec.num_workers)}


def computed(models, runners, decoded, device, tta: bool) -> Iterator[Batch]:
    """Decoded batches (positions, uint8 images, errors, look measures) -> Batch, with
    ``runners`` (a verified reduced precision: fp32 in its band)."""
    import torch

    from thumbclf.predict.ensemble import ensemble_predict

    for pos, x, errors, looks in decoded:
        with torch.inference_mode():
            probs, signals = ensemble_predict(models, runners, x, device, tta, looks=looks)
        yield pos, probs, signals, list(errors)


def decode_workers(requested: int) -> int:
    """Decoding processes next to the model: num_workers, or (-1) all cores but the model's one."""
    return requested if requested >= 0 else min(16, max(1, machine.cores() - 1))
