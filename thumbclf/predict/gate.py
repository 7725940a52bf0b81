"""The quality gate: may a faster engine or precision stand in for PyTorch fp32?

It judges what the user sees, each image's decision (a class, or Undecided), not the raw
argmax: two precisions that differ only on images that are Undecided either way change nothing.

Fast and exact (issue 29): the candidate computes every image, and PyTorch fp32 computes again
the images whose decision the candidate's error could change, those in the **band**: the top
probability within the band of the threshold, the top two classes within twice the band of a
tie (where the image could be decided), the content unfamiliarity within its band of 1. The
band is ``LIMITS["safety"]`` times the largest difference between candidate and fp32 measured on
the verification images (``discrepancy``), at least ``FLOOR``; it is kept in the verdict and,
in a deploy, widens by itself when a recomputed image shows a larger difference (``Band``).
Outside the band a decision cannot differ from fp32's; inside it, it is fp32's.

The rule (``LIMITS``), as the report states it:

1. **Agreement, no labels needed.** Both precisions compute a sample of up to
   ``AGREEMENT_IMAGES`` of the deploy's own images, plus the labelled verification images where
   there are any. With the band applied, no decision may differ from fp32's; and there must be
   at least ``min_images`` (149) of them: then, with 95% confidence (``confidence``), at most 2%
   (``max_changed``) of images differ by more than the largest difference measured (one-sided
   Clopper-Pearson), before the safety factor and the widening. The share of images the band
   sends to fp32 may be at most ``max_recomputed`` (50%): beyond it the candidate gains nothing.
   The decisions changed *without* the band and their Clopper-Pearson bound are reported too.
2. **Labels, where there are at least ``MIN_LABELLED``.** On the labelled images, with the
   band: macro AUROC may change by at most ``auroc`` (0.003), and accuracy among decided may
   drop by at most ``accuracy_decided`` (0.5 points) or by one image's worth, whichever is larger.

A model without labelled images passes on rule 1 alone, and the verdict says so. The functions
here are plain numpy on probabilities; inference.py runs the engines and caches the verdict.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score

from thumbclf.core.decide import UNDECIDED, decide_with_reasons, upper_bound
from thumbclf.core.table import UNFAMILIAR_CONTENT

AGREEMENT_IMAGES = 300  # of the deploy's own images (a seeded sample)
MIN_LABELLED = 10  # fewer labelled images: the label figures are not computed
LIMITS = {"max_changed": 0.02, "confidence": 0.95, "auroc": 0.003, "accuracy_decided": 0.005,
          "safety": 4.0, "max_recomputed": 0.5}
# the narrowest band, so that a candidate that matched fp32 exactly on the verification images
# still sends the closest calls to fp32, where a larger difference would widen the band
# the band's parts: any class probability, and the content part of the unfamiliarity (the look
# part and the tissue fraction do not depend on the precision)
PROBABILITY, UNFAMILIARITY = "probability", UNFAMILIAR_CONTENT
FLOOR = {PROBABILITY: 1e-4, UNFAMILIARITY: 1e-4}


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


def discrepancy(reference: np.ndarray, candidate: np.ndarray,
                reference_unfamiliarity: np.ndarray | None = None,
                candidate_unfamiliarity: np.ndarray | None = None) -> dict[str, float]:
    """The largest difference between candidate and fp32: of any probability, and of the
    content unfamiliarity (0 where there is none)."""
    diff = np.abs(np.asarray(reference, float) - np.asarray(candidate, float))
    out = {PROBABILITY: float(diff.max(initial=0.0)), UNFAMILIARITY: 0.0}
    if reference_unfamiliarity is not None and candidate_unfamiliarity is not None:
        du = np.abs(np.asarray(reference_unfamiliarity, float) -
                    np.asarray(candidate_unfamiliarity, float))
        out[UNFAMILIARITY] = float(np.nan_to_num(du, nan=0.0).max(initial=0.0))
    return out


def width(measured: dict, safety: float) -> dict[str, float]:
    """The band: ``safety`` times the measured differences, at least FLOOR."""
    return {k: max(safety * float(measured.get(k, 0.0)), FLOOR[k]) for k in FLOOR}


def near(probs: np.ndarray, threshold: float, band: dict,
         unfamiliarity: np.ndarray | None = None) -> np.ndarray:
    """Which images' decisions an error within ``band`` could change (each probability by at
    most band["probability"], the content unfamiliarity by at most band[UNFAMILIARITY])."""
    b = band[PROBABILITY]
    ordered = np.sort(np.asarray(probs, float), axis=1)
    top = ordered[:, -1]
    second = ordered[:, -2] if ordered.shape[1] > 1 else np.zeros_like(top)
    mask = (np.abs(top - threshold) <= b) | ((top - second <= 2 * b) & (top + b >= threshold))
    if unfamiliarity is not None:
        mask |= np.abs(np.asarray(unfamiliarity, float) - 1.0) <= band[UNFAMILIARITY]
    return mask


class Band:
    """The band of a deploy's candidate engine: what was measured (the verdicts'
    discrepancies), how many images it saw and sent to fp32, and the widening."""

    def __init__(self, measured: dict, safety: float, threshold: float):
        self.measured = {k: float(measured.get(k, 0.0)) for k in FLOOR}
        self.safety, self.threshold = float(safety), float(threshold)
        self.images = self.recomputed = self.widened = 0
        self.last = np.zeros(0, dtype=bool)  # which images of the last batch were recomputed

    @property
    def width(self) -> dict[str, float]:
        return width(self.measured, self.safety)

    def near(self, probs: np.ndarray, unfamiliarity: np.ndarray | None) -> np.ndarray:
        """The images to compute again in fp32 (counted)."""
        mask = near(probs, self.threshold, self.width, unfamiliarity)
        self.images += len(mask)
        self.recomputed += int(mask.sum())
        self.last = mask
        return mask

    def count(self, recomputed: np.ndarray) -> None:
        """Count images another process computed with this band (``recomputed``: which)."""
        self.images += len(recomputed)
        self.recomputed += int(np.asarray(recomputed, dtype=bool).sum())

    def learn(self, seen: dict) -> None:
        """Widen the band where a recomputed image differed by more than measured so far."""
        wider = {k: v for k, v in seen.items() if v > self.measured[k]}
        if wider:
            self.widened += 1
            self.measured.update(wider)

    def describe(self) -> str:
        w = self.width
        share = self.recomputed / self.images if self.images else 0.0
        u = f", unfamiliarity ±{w[UNFAMILIARITY]:.2g}" if self.measured[UNFAMILIARITY] else ""
        return (f"{self.recomputed} of {self.images} images ({100 * share:.1f}%) recomputed in "
                f"fp32 (band: probability ±{w[PROBABILITY]:.2g}{u}; {self.safety:g}x the "
                "largest difference measured"
                + (f"; widened {self.widened} times" if self.widened else "") + ")")


def banded(reference: np.ndarray, candidate: np.ndarray, threshold: float, band: dict,
           reference_unfamiliarity=None, candidate_unfamiliarity=None):
    """The candidate's probabilities and unfamiliarity with the band applied (fp32's inside it),
    and which images were inside."""
    mask = near(candidate, threshold, band, candidate_unfamiliarity)
    probs = np.where(mask[:, None], reference, candidate)
    u = (None if candidate_unfamiliarity is None else
         np.where(mask, reference_unfamiliarity, candidate_unfamiliarity))
    return probs, u, mask


def gate(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray,
         classes: tuple[str, ...], threshold: float, *, deploy_images: int,
         unfamiliarity: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
         limits: dict | None = None) -> dict:
    """The verdict of a candidate's probabilities against PyTorch fp32's on the same images.

    ``labels``: the class index of each image, -1 where it has none (the deploy's own images,
    the first ``deploy_images`` rows); ``unfamiliarity``: fp32's and the candidate's content
    scores of the unfamiliar-slide rule (the part the model computes), in that order.
    """
    lim = {**LIMITS, **(limits or {})}
    reference_unfamiliarity, candidate_unfamiliarity = unfamiliarity
    labels = np.asarray(labels, dtype=int)
    measured = discrepancy(reference, candidate, reference_unfamiliarity, candidate_unfamiliarity)
    band = width(measured, lim["safety"])
    probs, u, inside = banded(reference, candidate, threshold, band, reference_unfamiliarity,
                              candidate_unfamiliarity)
    ref_dec = decisions(reference, classes, threshold, reference_unfamiliarity)
    raw_dec = decisions(candidate, classes, threshold, candidate_unfamiliarity)
    raw = ref_dec != raw_dec
    cand_dec = decisions(probs, classes, threshold, u)
    changed = ref_dec != cand_dec
    n, k = len(labels), int(raw.sum())
    verdict = {
        "images": n, "deploy_images": int(deploy_images),
        "labelled": int((labels >= 0).sum()), "changed": k,
        "changed_with_band": int(changed.sum()),
        "changed_between_classes": int((raw & (ref_dec != UNDECIDED) &
                                        (raw_dec != UNDECIDED)).sum()),
        "argmax_changed": int((reference.argmax(1) != candidate.argmax(1)).sum()),
        "changed_bound": upper_bound(k, n, lim["confidence"]), "limits": lim,
        "min_images": min_images(lim), "discrepancy": measured, "band": band,
        "recomputed": float(inside.mean()) if n else 0.0, "labels": None, "failed": [],
    }
    if changed.any() or n < verdict["min_images"]:
        verdict["failed"].append("agreement")
    if verdict["recomputed"] > lim["max_recomputed"]:
        verdict["failed"].append("recomputed")
    has = labels >= 0
    if has.sum() >= MIN_LABELLED:
        verdict["labels"] = _label_rule(reference[has], ref_dec[has], probs[has], cand_dec[has],
                                        labels[has], classes, lim, verdict["failed"])
    verdict["passed"] = not verdict["failed"]
    return verdict


def _label_rule(reference, ref_dec, candidate, cand_dec, y, classes, lim, failed) -> dict:
    """Rule 2 on the labelled images (appending what failed to ``failed``)."""
    ref = label_figures(reference, ref_dec, y, classes)
    cand = label_figures(candidate, cand_dec, y, classes)
    d_auroc = (abs(cand["auroc"] - ref["auroc"]) if np.isfinite(ref["auroc"])
               and np.isfinite(cand["auroc"]) else 0.0)
    d_acc = (ref["accuracy_decided"] - cand["accuracy_decided"]
             if np.isfinite(ref["accuracy_decided"]) and np.isfinite(cand["accuracy_decided"])
             else 0.0)
    allowed = max(lim["accuracy_decided"],
                  1.0 / ref["decided"] + 1e-9 if ref["decided"] else 0.0)
    if d_auroc > lim["auroc"]:
        failed.append("auroc")
    if d_acc > allowed:
        failed.append("accuracy_decided")
    return {"reference": ref, "candidate": cand, "auroc_change": d_auroc,
            "accuracy_decided_drop": d_acc, "accuracy_allowed": allowed,
            "coverage_change": abs(cand["coverage"] - ref["coverage"])}


def describe(v: dict) -> str:
    """The verdict in one line: the evidence used, the figures and their limits."""
    lim = v["limits"]
    parts = []
    if v["deploy_images"]:
        parts.append(f"{v['deploy_images']} of this deploy's images")
    if v["labelled"]:
        parts.append(f"{v['labelled']} labelled images")
    where = " and ".join(parts) or "no images"
    band = v["band"]
    u = (f", unfamiliarity ±{band[UNFAMILIARITY]:.2g}" if v["discrepancy"][UNFAMILIARITY]
         else "")
    text = (f"with the band (probability ±{band[PROBABILITY]:.2g}{u}: {lim['safety']:g}x the "
            f"largest difference measured), "
            f"decisions changed on {v['changed_with_band']} of {v['images']} images ({where}; "
            f"at least {v['min_images']} needed), {100 * v['recomputed']:.1f}% of them recomputed "
            f"in fp32 (limit {100 * lim['max_recomputed']:g}%); without the band decisions "
            f"changed on {v['changed']} (at most {100 * v['changed_bound']:.1f}% with "
            f"{100 * lim['confidence']:.0f}% confidence)")
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
