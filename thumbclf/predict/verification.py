"""The quality gate's evidence (the images both precisions compute) and the check that
runs a candidate and PyTorch fp32 on it (inference.choose caches its verdict)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

from thumbclf.nn.training import softmax
from thumbclf.nn.familiarity import split
from thumbclf.predict import gate as quality

if TYPE_CHECKING:
    from thumbclf.predict.inference import ModelSpec, Runner

GATE = quality.LIMITS  # the gate's limits (gate.py), also a part of the verdict's cache key


class Evidence:
    """The images the quality gate compares two precisions on (gate.py says how), decoded only
    when a verdict is not cached.

    ``key`` names the images (the verdict cache's key) and ``planned`` counts them, both known
    before decoding; ``decode()`` returns (a function that normalises a uint8 NHWC batch, the
    uint8 batches, the labels, how many are the deploy's own): the images are in order, first
    the first images of the deploy's stream, then the other labelled ones; ``labels`` has a
    class index per image, -1 for the deploy's own unlabelled ones.
    """

    def __init__(self, key: str, planned: int,
                 decode: Callable[[], tuple[Callable, list[torch.Tensor], np.ndarray, int]]):
        self.key, self.planned, self._decode, self._done = key, planned, decode, None

    def _get(self):
        if self._done is None:
            self._done = self._decode()
        return self._done

    def batches(self) -> Iterator[torch.Tensor]:
        """Normalised NCHW float batches."""
        normalise, batches, _, _ = self._get()
        return (normalise(b) for b in batches)

    @property
    def labels(self) -> np.ndarray:
        return self._get()[2]

    @property
    def deploy_images(self) -> int:
        return self._get()[3]


class Check:
    """The gate's evidence and PyTorch fp32's outputs on it, computed once for all the
    candidates of a model."""

    def __init__(self, exact: Runner, verify, m: ModelSpec):
        self.exact, self.verify, self.m = exact, verify, m
        self._evidence: list = []
        self._reference = None

    def evidence(self) -> Evidence | None:
        if not self._evidence:
            self._evidence.append(self.verify() if self.verify is not None else None)
        return self._evidence[0]

    def key(self) -> str:
        ev = self.evidence()
        return ev.key if ev is not None else ""

    def refusal(self, name: str) -> str | None:
        """Why ``name`` cannot even be checked (too few images), else None."""
        ev = self.evidence()
        n = ev.planned if ev is not None else 0
        why = quality.too_few(n, GATE)
        return f"{name} not verified: {why}" if why else None

    def _probs(self, runner: Runner) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = np.concatenate([runner(b).numpy() for b in self.evidence().batches()])
        logits, features = split(outputs, len(self.m.classes))
        rule = self.m.familiarity
        unfamiliarity = rule.unfamiliarity(features) if rule is not None and features.shape[1] \
            else None
        return softmax(logits, self.m.temperature), unfamiliarity

    def verdict(self, runner: Runner) -> dict:
        if self._reference is None:
            self._reference = self._probs(self.exact)
        (ref, ref_u), (cand, cand_u) = self._reference, self._probs(runner)
        ev = self.evidence()
        return quality.gate(ref, cand, ev.labels, self.m.classes, self.m.threshold,
                            deploy_images=ev.deploy_images, unfamiliarity=(ref_u, cand_u),
                            limits=GATE)
