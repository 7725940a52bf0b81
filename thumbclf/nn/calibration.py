"""Temperature scaling: one number that makes a model's probabilities mean what they say."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

MIN_CALIBRATION_IMAGES = 30
PRIOR_SD = 1.0  # prior on log T: N(0, 1), i.e. T within 1/7-7 with 95% prior belief


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and how far to trust it, as the model file and the report keep it."""

    temperature: float
    status: str  # "fitted", "separable" (set by the prior), "skipped" or "off"
    images: int

    def describe(self) -> str:
        if self.status == "off":
            return "calibration off (calibrate: false)"
        if self.status == "skipped":
            return (f"calibration skipped: {self.images} validation images (need "
                    f"{MIN_CALIBRATION_IMAGES}); probabilities are the model's own")
        if self.status == "separable":
            return (f"temperature {self.temperature:.2f}: every one of the {self.images} "
                    "validation images was classified correctly, so the data alone would make "
                    "every prediction certain; the prior set the temperature")
        side = ("the model was under-confident; probabilities sharpened" if self.temperature < 1
                else "the model was over-confident; probabilities softened")
        return f"temperature {self.temperature:.2f} on {self.images} validation images ({side})"

    def short(self) -> str:
        """A few words, for a list of folds."""
        return {"off": "off", "skipped": f"skipped ({self.images} images)",
                "separable": f"T {self.temperature:.2f} (set by the prior: all {self.images} "
                             "images correct)"}.get(self.status,
                                                    f"T {self.temperature:.2f} ({self.images} images)")

    @classmethod
    def from_file(cls, obj: dict | None) -> "Calibration | None":
        """As ``to_file`` wrote it (None: a model file from before calibration was recorded)."""
        if not obj:
            return None
        return cls(float(obj["temperature"]), str(obj["status"]), int(obj["images"]))

    def to_file(self) -> dict:
        return {"temperature": self.temperature, "status": self.status, "images": self.images,
                "method": "temperature scaling, MAP with a N(0, 1) prior on log T"}


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> Calibration:
    """Temperature T maximising the validation likelihood of softmax(logits / T) times a
    N(0, 1) prior on log T (maximum a posteriori). No clamp is needed: on an ordinary split
    the data decide (30 images outweigh the prior), and on a perfectly classified split,
    where the likelihood alone keeps rising as T -> 0, the prior stops it at a finite T.

    Fewer than 30 validation images give T = 1 (status "skipped").
    """
    n = len(y)
    if n < MIN_CALIBRATION_IMAGES:
        # debug only: the fold's line says it once (Calibration.describe)
        log.debug("calibration skipped: the validation split has %d images (need %d: more "
                  "images or a larger val_fraction); probabilities left uncalibrated", n,
                  MIN_CALIBRATION_IMAGES)
        return Calibration(1.0, "skipped", n)
    z = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    t = torch.from_numpy(np.asarray(y)).long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")
    nll = nn.CrossEntropyLoss(reduction="sum")

    def closure():
        opt.zero_grad()
        loss = nll(z / log_t.exp(), t) + 0.5 * (log_t / PRIOR_SD).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    temp = float(log_t.detach().exp())
    if not np.isfinite(temp):  # cannot happen with the prior; kept as a guard
        log.warning("calibration failed (temperature not finite); probabilities left "
                    "uncalibrated")
        return Calibration(1.0, "skipped", n)
    separable = bool((z.argmax(1) == t).all())
    result = Calibration(temp, "separable" if separable else "fitted", n)
    (log.warning if separable else log.info)("calibration: %s", result.describe())
    return result
