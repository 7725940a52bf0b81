"""Every random stream of a run, by name, from the experiment's ``seed``.

Each stream is its own generator, so that adding a draw to one stream leaves the others (and
the numbers a run gives) as they were. A training fold's streams (fold 0: full training):

- ``init``: torch's global seed before the model is built (its initial weights);
- ``batches``: the order of the training batches and the sampler's draws;
- ``augmentation``: training's augmentation; each DDP rank draws its own (rank 0 as a single
  process does);
- ``bn_sample``: the training images whose BatchNorm statistics are re-estimated each epoch;
- ``feature_bank``: the training passes whose features the unfamiliar rule keeps;
- ``bank``: the training images the rule's bank falls back to when no pass was kept;
- ``looks``: the augmentation of those images for the rule's look part.

Pretraining (BYOL) has ``init``, ``batches``, ``augmentation`` and ``bn_sample`` of its own.
The numbers are those of thumbclf 1.2, so that a seed gives the same run as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PRETRAIN = 16  # pretraining's streams sit where a 16th fold's would; folds stop at 15


@dataclass(frozen=True)
class Streams:
    """The random streams of one training fold (or of pretraining: ``pretraining()``)."""

    seed: int
    fold: int = 0
    rank: int = 0  # the DDP rank: only augmentation differs between ranks

    @classmethod
    def pretraining(cls, seed: int) -> "Streams":
        return cls(seed, PRETRAIN)

    @property
    def _pretrain(self) -> bool:
        return self.fold == PRETRAIN

    @property
    def init(self) -> int:
        return self.seed if self._pretrain else self.seed * 1000 + self.fold

    def batches(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.fold])

    def augmentation(self) -> torch.Generator:
        offset = 0 if self._pretrain else 7 + 100_003 * self.rank
        return torch.Generator().manual_seed(self.seed * 1000 + self.fold + offset)

    def bn_sample(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.fold + 1] if self._pretrain
                                     else [self.seed, self.fold, 1])

    @property
    def feature_bank(self) -> int:
        return self.seed * 1000 + self.fold

    @property
    def bank(self) -> list[int]:
        return [self.seed, self.fold, 2]

    @property
    def looks(self) -> int:
        return self.seed * 1000 + self.fold + 11
