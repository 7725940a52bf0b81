"""Probabilities -> decisions: the most probable class, or 'Undecided' below the threshold."""

from __future__ import annotations

import numpy as np

UNDECIDED = "Undecided"


def decide(probs: np.ndarray, classes: tuple[str, ...] | list[str], threshold: float) -> list[str]:
    """The class with the highest probability, unless that probability is below ``threshold``."""
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"expected probabilities of shape (n, {len(classes)}); got {probs.shape}")
    best = probs.argmax(axis=1)
    top = probs[np.arange(len(probs)), best]
    return [classes[b] if p >= threshold else UNDECIDED for b, p in zip(best, top)]


def threshold_for_accuracy(probs: np.ndarray, y: np.ndarray, target: float) -> float | None:
    """Smallest threshold at which accuracy among decided cases reaches ``target`` (None if never)."""
    probs = np.asarray(probs, dtype=float)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y)
    order = np.argsort(-conf, kind="stable")
    conf_sorted, corr_sorted = conf[order], correct[order]
    cum_acc = np.cumsum(corr_sorted) / np.arange(1, len(order) + 1)
    # decide the k most confident cases; ties in confidence must be decided together
    best = None
    for k in range(len(order), 0, -1):
        if k < len(order) and conf_sorted[k] == conf_sorted[k - 1]:
            continue
        if cum_acc[k - 1] >= target:
            best = float(conf_sorted[k - 1])
            break
    return best
