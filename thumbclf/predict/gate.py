"""The quality gate: may a faster engine or precision stand in for PyTorch fp32?

It judges what the user sees, each image's decision (a class, or Undecided), not the raw
argmax: two precisions that differ only on images that are Undecided either way change nothing.

The rule (``LIMITS``), as the report states it:

1. **Agreement, no labels needed.** Both precisions decide a seeded sample of up to
   ``AGREEMENT_IMAGES`` of the deploy's own images, plus the labelled verification images where
   there are any. From the number of images whose decision changed, ``changed`` of ``n``, the
   one-sided Clopper-Pearson bound says how large the share of changed decisions can be at
   ``confidence`` (95%); it must be at most ``max_changed`` (2%). The bound is honest about the
   sample: with no change at all, ``n`` must be at least 149 for it to fall to 2% (``min_images``),
   so a small sample cannot pass, whatever it shows.
2. **Labels, where there are at least ``MIN_LABELLED``.** On the labelled images: macro AUROC
   may change by at most ``auroc`` (0.003), and accuracy among decided may drop by at most
   ``accuracy_decided`` (0.5 points) or by one image's worth, whichever is larger (one changed
   decision among few decided images moves the accuracy by more than 0.5 points, and rule 1
   already bounds how many may change).

A model without labelled images passes on rule 1 alone, and the verdict says so. The functions
here are plain numpy on probabilities; inference.py runs the engines and caches the verdict.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

from thumbclf.core.decide import UNDECIDED, decide_with_reasons

AGREEMENT_IMAGES = 300  # of the deploy's own images (a seeded sample)
MIN_LABELLED = 10  # fewer labelled images: the label figures are not computed
LIMITS = {"max_changed": 0.02, "confidence": 0.95, "auroc": 0.003, "accuracy_decided": 0.005}


def upper_bound(changed: int, n: int, confidence: float) -> float:
    """The one-sided Clopper-Pearson upper bound of a share seen as ``changed`` of ``n``."""
    if n <= 0 or changed >= n:
        return 1.0
    return float(stats.beta.ppf(confidence, changed + 1, n - changed))


def min_images(limits: dict | None = None) -> int:
    """The fewest images on which the gate can pass at all (none of them changed)."""
    lim = limits or LIMITS
    if lim["max_changed"] >= 1:
        return 1
    if lim["max_changed"] <= 0:
        return 10**12
    return math.ceil(math.log(1 - lim["confidence"]) / math.log(1 - lim["max_changed"]))


def decisions(probs: np.ndarray, classes: tuple[str, ...], threshold: float,
              unfamiliarity: np.ndarray | None = None) -> np.ndarray:
    """What the user sees of each image: a class name or Undecided (either reason)."""
    return np.array(decide_with_reasons(probs, classes, threshold, unfamiliarity)[0],
                    dtype=object)


def label_figures(probs: np.ndarray, dec: np.ndarray, y: np.ndarray,
                  classes: tuple[str, ...]) -> dict:
    """Macro AUROC, coverage and accuracy among decided of labelled images."""
    decided = dec != UNDECIDED
    truth = np.array(classes, dtype=object)[y]
    present = np.unique(y)
    auroc = float("nan")
    if len(present) >= 2:
        sub = probs[:, present] / np.maximum(probs[:, present].sum(axis=1, keepdims=True), 1e-12)
        try:
            auroc = float(roc_auc_score(y, sub, multi_class="ovr", labels=present)
                          if len(present) > 2 else roc_auc_score(y == present[1], sub[:, 1]))
        except ValueError:
            pass
    return {"auroc": auroc, "coverage": float(decided.mean()), "decided": int(decided.sum()),
            "accuracy_decided": float((dec[decided] == truth[decided]).mean())
            if decided.any() else float("nan")}


def gate(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray,
         classes: tuple[str, ...], threshold: float, *, deploy_images: int,
         reference_unfamiliarity: np.ndarray | None = None,
         candidate_unfamiliarity: np.ndarray | None = None, limits: dict | None = None) -> dict:
    """The verdict of a candidate's probabilities against PyTorch fp32's on the same images.

    ``labels``: the class index of each image, -1 where it has none (the deploy's own images,
    the first ``deploy_images`` rows); ``*_unfamiliarity``: the unfamiliar-slide rule's scores.
    """
    lim = dict(limits or LIMITS)
    labels = np.asarray(labels, dtype=int)
    ref_dec = decisions(reference, classes, threshold, reference_unfamiliarity)
    cand_dec = decisions(candidate, classes, threshold, candidate_unfamiliarity)
    changed = ref_dec != cand_dec
    n, k = len(labels), int(changed.sum())
    bound = upper_bound(k, n, lim["confidence"])
    was_decided = ref_dec != UNDECIDED
    verdict = {
        "images": n, "deploy_images": int(deploy_images),
        "labelled": int((labels >= 0).sum()), "changed": k,
        "changed_between_classes": int((changed & was_decided & (cand_dec != UNDECIDED)).sum()),
        "argmax_changed": int((reference.argmax(1) != candidate.argmax(1)).sum()),
        "changed_bound": bound, "limits": lim, "min_images": min_images(lim),
        "labels": None, "failed": [],
    }
    if bound > lim["max_changed"]:
        verdict["failed"].append("agreement")
    has = labels >= 0
    if has.sum() >= MIN_LABELLED:
        y = labels[has]
        ref = label_figures(reference[has], ref_dec[has], y, classes)
        cand = label_figures(candidate[has], cand_dec[has], y, classes)
        d_auroc = (abs(cand["auroc"] - ref["auroc"]) if np.isfinite(ref["auroc"])
                   and np.isfinite(cand["auroc"]) else 0.0)
        d_acc = (ref["accuracy_decided"] - cand["accuracy_decided"]
                 if np.isfinite(ref["accuracy_decided"]) and np.isfinite(cand["accuracy_decided"])
                 else 0.0)
        allowed = max(lim["accuracy_decided"],
                      1.0 / ref["decided"] + 1e-9 if ref["decided"] else 0.0)
        verdict["labels"] = {"reference": ref, "candidate": cand, "auroc_change": d_auroc,
                             "accuracy_decided_drop": d_acc, "accuracy_allowed": allowed,
                             "coverage_change": abs(cand["coverage"] - ref["coverage"])}
        if d_auroc > lim["auroc"]:
            verdict["failed"].append("auroc")
        if d_acc > allowed:
            verdict["failed"].append("accuracy_decided")
    verdict["passed"] = not verdict["failed"]
    return verdict


def describe(v: dict) -> str:
    """The verdict in one line: the evidence used, the figures and their limits."""
    lim = v["limits"]
    parts = []
    if v["deploy_images"]:
        parts.append(f"{v['deploy_images']} of this deploy's images")
    if v["labelled"]:
        parts.append(f"{v['labelled']} labelled images")
    where = " and ".join(parts) or "no images"
    text = (f"decisions changed on {v['changed']} of {v['images']} images ({where}); the share "
            f"of changed decisions is at most {100 * v['changed_bound']:.1f}% with "
            f"{100 * lim['confidence']:.0f}% confidence (limit {100 * lim['max_changed']:g}%)")
    if v["labels"] is None:
        return text + "; no labels used: agreement alone"
    g = v["labels"]
    accuracy = (f"accuracy among decided down {100 * g['accuracy_decided_drop']:.1f} points (max "
                f"{100 * g['accuracy_allowed']:.1f})" if g["reference"]["decided"]
                else "none of them decided")
    return (text + f"; on the {v['labelled']} labelled images, macro AUROC change "
            f"{g['auroc_change']:.4f} (max {lim['auroc']:g}) and {accuracy}")


def too_few(n: int, limits: dict | None = None) -> str | None:
    """Why ``n`` images cannot pass the gate (None when they can)."""
    need = min_images(limits)
    lim = limits or LIMITS
    if n >= need:
        return None
    return (f"{n} images to check it on; even with no decision changed, at least {need} are "
            f"needed to show that at most {100 * lim['max_changed']:g}% of decisions change "
            f"({100 * lim['confidence']:.0f}% confidence)")
