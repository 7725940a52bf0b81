"""Unfamiliar slides: how far an image's features lie from everything the model was trained on.

A model is forced to pick one of its classes, even for a slide type it never saw (a cytology
smear, a frozen section, a special stain). Confidence alone does not catch that: such slides
are often classified with high confidence. This module gives the second reason for
*Undecided*:

- the model's features are the input of its classification head (global-average-pooled where
  that input is a feature map), L2-normalised;
- at training, the features of up to ``BANK_SIZE`` training images (a seeded sample, unaugmented)
  are kept in the model file, in float16 (about 1 MB for ResNet-18);
- an image's score is the cosine distance to its ``K``-th nearest training feature (deep
  nearest neighbours, Sun et al., ICML 2022); no assumption about the shape of the classes;
- the model file stores the ``QUANTILE`` of the validation split's scores (images the model
  did not train on, as deployment images are); the threshold is that times ``MARGIN``, so that
  the noise of a quantile estimated on a few dozen images, and a moderate difference between
  labs, do not make ordinary slides unfamiliar. MARGIN 1.5 was chosen with bench/trust.py
  (synthetic slides): it kept 80% of an unseen slide type Undecided while a moderate stain and
  scanner shift lost 4% of coverage instead of 16% (margin 1);
- ``unfamiliarity`` = score / threshold, averaged over an ensemble's models; above 1 the slide
  is Undecided with the reason ``unfamiliar`` (decide.decide_with_reasons).

Model files written before this rule (thumbclf 1.0, the prototype's) have no features: they
deploy with confidence-only decisions, and the run says so once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)
BANK_SIZE = 1024
K = 5
QUANTILE = 0.99
MARGIN = 1.5
MIN_VALIDATION = 20  # fewer validation images: no threshold can be chosen, the rule is off


class WithFeatures(nn.Module):
    """``model`` whose output is [logits, features]: one tensor, so that every inference engine
    (PyTorch, OpenVINO) computes both in one pass. ``split`` separates them again."""

    def __init__(self, model: nn.Module, head: str):
        super().__init__()
        self.model = model
        self.head = head  # the head's name: its input are the features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept: list[torch.Tensor] = []

        def keep(_module, inputs):
            f = inputs[0]
            kept.append(f.mean(dim=(2, 3)) if f.dim() == 4 else f.flatten(1))  # squeezenet:
            # a conv head whose input is a feature map, averaged over space

        # the hook lives for this call only: the plain model (Grad-CAM, training) is untouched
        hook = self.model.get_submodule(self.head).register_forward_pre_hook(keep)
        try:
            logits = self.model(x)
        finally:
            hook.remove()
        if isinstance(logits, tuple):  # inception in training mode; not used for features
            logits = logits[0]
        return torch.cat([logits, kept[-1].to(logits.dtype)], dim=1)


class Capture:
    """The features (the head's pooled input, as WithFeatures gives them) of every forward pass
    of ``model`` inside the ``with`` block, for the passes training makes anyway."""

    def __init__(self, model: nn.Module, head: str | None):
        self.model, self.head, self.rows = model, head, []

    def __enter__(self) -> "Capture":
        if self.head is not None:
            self._hook = self.model.get_submodule(self.head).register_forward_pre_hook(self._keep)
        return self

    def _keep(self, _module, inputs) -> None:
        f = inputs[0].detach()
        self.rows.append((f.mean(dim=(2, 3)) if f.dim() == 4 else f.flatten(1)).float().cpu())

    def __exit__(self, *exc) -> None:
        if self.head is not None:
            self._hook.remove()

    def features(self) -> np.ndarray | None:
        return torch.cat(self.rows).numpy() if self.rows else None


def split(output: torch.Tensor | np.ndarray, n_classes: int):
    """(logits, features) of a WithFeatures output (features empty for a plain model)."""
    return output[:, :n_classes], output[:, n_classes:]


def normalise(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def scores(features: np.ndarray, bank: np.ndarray, k: int = K) -> np.ndarray:
    """Cosine distance of each row of ``features`` to its k-th nearest bank row."""
    f, b = normalise(features), np.asarray(bank, dtype=np.float32)
    if len(f) == 0:
        return np.zeros(0)
    k = min(k, len(b))
    out = np.empty(len(f))
    for i in range(0, len(f), 1024):  # bounded memory for big batches and banks
        sim = f[i:i + 1024] @ b.T
        kth_similarity = -np.partition(-sim, k - 1, axis=1)[:, k - 1]
        out[i:i + 1024] = 1.0 - kth_similarity
    return out


@dataclass(frozen=True)
class Familiarity:
    """What the model file stores for the rule."""

    bank: np.ndarray  # (n, d) L2-normalised training features
    threshold: float  # the validation quantile of the scores (the file's "threshold")
    k: int = K
    quantile: float = QUANTILE

    def unfamiliarity(self, features: np.ndarray) -> np.ndarray:
        """score / (validation quantile x MARGIN): above 1, unfamiliar."""
        return scores(features, self.bank, self.k) / (self.threshold * MARGIN)

    def to_file(self) -> dict:
        return {"bank": torch.from_numpy(self.bank.astype(np.float16)),
                "threshold": float(self.threshold), "k": int(self.k),
                "quantile": float(self.quantile)}

    @classmethod
    def from_file(cls, obj: dict | None) -> "Familiarity | None":
        if not obj:
            return None
        return cls(obj["bank"].float().numpy(), float(obj["threshold"]), int(obj["k"]),
                   float(obj["quantile"]))


def fit(train_features: np.ndarray, val_features: np.ndarray) -> Familiarity | None:
    """The bank (the features of at most BANK_SIZE training images, which the caller picks)
    and the validation threshold; None (with the reason logged) when the validation split is
    too small to choose it."""
    if len(val_features) < MIN_VALIDATION or len(train_features) < K:
        log.warning("unfamiliar-slide rule off for this model: %d validation images (need %d "
                    "to choose its threshold: more images or a larger val_fraction)",
                    len(val_features), MIN_VALIDATION)
        return None
    bank = normalise(train_features).astype(np.float16).astype(np.float32)  # as the file has it
    threshold = float(np.quantile(scores(val_features, bank), QUANTILE))
    return Familiarity(bank, max(threshold, 1e-6))


def rule_sentence(rule: Familiarity | None = None) -> str:
    """What the report says of the rule in force (``rule``: with its bank's size)."""
    how = (f" (cosine distance to the {rule.k}th nearest of {len(rule.bank)} training images)"
           if rule is not None else "")
    return (f"Unfamiliar-slide rule: on; a slide whose features lie {MARGIN:g} times further "
            f"from the training images than {QUANTILE:.0%} of the validation images did{how} "
            "is Undecided (undecided_reason 'unfamiliar').")


def ensemble_unfamiliarity(rules: list[Familiarity | None], features: list[np.ndarray]
                           ) -> np.ndarray | None:
    """Mean unfamiliarity over the models; None when any model has no rule."""
    if not rules or any(r is None for r in rules):
        return None
    return np.mean([r.unfamiliarity(f) for r, f in zip(rules, features)], axis=0)
