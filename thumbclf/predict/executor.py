"""What an executor is: the settings it runs with (``ExecutorSpec``), the batches it yields
(``Batch``) and the two jobs it does for the workflows (``Executor``); and how a prediction
runs on one (``InferenceSpec``). The executors themselves
live in local.py (this machine) and ray_backend.py (a Ray cluster); execution.py chooses one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from thumbclf.core.layout import CACHE_FOLDER


@dataclass(frozen=True)
class ExecutorSpec:
    """Where and how predictions and folds run: the executor keys of an experiment
    (executor, ray_address, num_workers, cpus_per_fold) and what predicting needs (batch_size,
    tta, device). ``source`` names the experiment in messages."""

    executor: str = "local"
    num_workers: int = -1
    batch_size: int = 64
    tta: bool = False
    device: str = "auto"
    ray_address: str | None = None
    cpus_per_fold: int = 0
    source: Path | str = "experiment"


@dataclass(frozen=True)
class InferenceSpec:
    """How predictions are computed, built by the recipe from its params in its first lines
    (workflows/run.py ``inference_spec``): where and how batches run (``executor``: batch_size,
    num_workers, tta, device), the engine and precision keys, the cache folder of converted
    engines and their verdicts (``cache_dir``), the slide-thumbnail cache (``slide_cache``),
    and the labelled images the quality gate may use (``verify_data``; None: the models'
    validation splits). ``progress``: show progress bars (prediction, int8 quantisation)."""

    executor: ExecutorSpec = ExecutorSpec()
    engine: str = "auto"
    precision: str = "auto"
    cache_dir: Path = Path(CACHE_FOLDER)
    slide_cache: Path | None = None
    verify_data: Path | None = None
    progress: bool = False

    @property
    def batch_size(self) -> int:
        return self.executor.batch_size

    @property
    def num_workers(self) -> int:
        return self.executor.num_workers

    @property
    def tta(self) -> bool:
        return self.executor.tta


# positions, probabilities (n, classes), the decision step's other inputs by table column
# (tissue fraction, unfamiliarity and its parts: familiarity.ensemble_signals), errors
Batch = tuple[np.ndarray, np.ndarray, "dict[str, np.ndarray]", list[str]]


class Executor(Protocol):
    """Predicts batches and runs folds, the same whatever runs them."""

    name: str
    spec: ExecutorSpec

    def predict(self, models, positions: list[int], paths: list[Path], *, device,
                slide_cache: Path | None, runners=None) -> Iterator[Batch]:
        """Batches for the images to predict, in any order."""

    def run_folds(self, fn: Callable, folds: list[int], shared: dict[str, Any], *,
                  device) -> Iterator:
        """``fn(fold=k, device=..., **shared)`` for every fold, in fold order."""

    def describe(self) -> dict:
        """The executor and its workers, for timings.json and the report."""
