"""Probabilities -> decisions: the most probable class, or 'Undecided' below the threshold."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)
UNDECIDED = "Undecided"
DEFAULT_THRESHOLD = 0.9
# why a case is Undecided, in the order the rules apply
NO_TISSUE, UNFAMILIAR, LOW_CONFIDENCE = "no tissue", "unfamiliar", "low confidence"
UNFAMILIAR_SOURCE = "unfamiliar source"  # most slides of its source are unfamiliar
REASONS = (NO_TISSUE, UNFAMILIAR, UNFAMILIAR_SOURCE, LOW_CONFIDENCE)
# sources (the SOURCE column) of fewer slides than this are pooled and judged together
MIN_SOURCE_SLIDES = 20
# A source is judged only where its unfamiliar slides would be this unlikely (p-value) among
# ordinary slides, of which the unfamiliar rule calls at most ORDINARY_UNFAMILIAR unfamiliar (a
# generous bound: about 2% by construction, 0-4% measured on the synthetic lab shift); so a
# handful of slides is judged only on strong evidence: 4 of 5 unfamiliar, 5 of 8, 6 of 10.
SOURCE_EVIDENCE = 0.001
ORDINARY_UNFAMILIAR = 0.1
POOLED = "(sources of fewer slides, pooled)"
# A deploy looks unlike the training slides where more than LOOK_SHIFTED of its slides with
# tissue lie beyond the look of 99% of the model's training and validation slides, and so many
# would be unlikely (SOURCE_EVIDENCE) among ordinary slides, of which at most LOOK_ORDINARY do:
# 1% by construction, but the percentile is an estimate and a lab's own slides drift, so a
# generous bound. Measured (bench/realworld.py, three trained models): 1.7% of the synthetic
# test slides, 0% of an archive of one type, 1.1-1.7% with an unseen type mixed in; 60-93% /
# 98-100% / 100% of the same test slides as other labs would scan them (shift 1 / 1.5 / 2);
# 59-92% of the real thumbnails of 14 public sources.
LOOK_ORDINARY = 0.05
LOOK_SHIFTED = 0.10
# the share of a thumbnail that must be tissue (nn/look.py measures it): below it a slide is
# blank, pen or label only, or a fragment of about 10 x 10 pixels of the model's 224
NO_TISSUE_FRACTION = 0.002
# a threshold the report suggests must decide at least this many labelled slides: below it, an
# accuracy of 95% or 99% is one or two lucky slides, not evidence
MIN_DECIDED_FOR_SUGGESTION = 20


def decide(probs: np.ndarray, classes: tuple[str, ...] | list[str], threshold: float) -> list[str]:
    """The class with the highest probability, unless that probability is below ``threshold``."""
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"expected probabilities of shape (n, {len(classes)}); got {probs.shape}")
    best = probs.argmax(axis=1)
    top = probs[np.arange(len(probs)), best]
    return [classes[b] if p >= threshold else UNDECIDED for b, p in zip(best, top)]


def decide_with_reasons(probs: np.ndarray, classes: tuple[str, ...] | list[str], threshold: float,
                        unfamiliarity: np.ndarray | None = None,
                        tissue: np.ndarray | None = None) -> tuple[list[str], list[str]]:
    """Decisions and, for each Undecided, why, first that applies: 'no tissue' (a tissue
    fraction below NO_TISSUE_FRACTION), 'unfamiliar' (unfamiliarity above 1, whatever the
    confidence; familiarity.py), 'low confidence' (below the threshold)."""
    decisions = decide(probs, classes, threshold)
    reasons = [LOW_CONFIDENCE if d == UNDECIDED else "" for d in decisions]
    if unfamiliarity is not None:
        for i in np.flatnonzero(np.asarray(unfamiliarity, dtype=float) > 1.0):
            decisions[i], reasons[i] = UNDECIDED, UNFAMILIAR
    if tissue is not None:
        for i in np.flatnonzero(np.asarray(tissue, dtype=float) < NO_TISSUE_FRACTION):
            decisions[i], reasons[i] = UNDECIDED, NO_TISSUE
    return decisions, reasons


@dataclass(frozen=True)
class SourceVerdict:
    """One group of slides judged as a whole: its name ('' = the whole deploy), how many of its
    slides with tissue were judged, and the share of them that is unfamiliar."""

    name: str
    judged: int
    unfamiliar: float


def unfamiliar_sources(decisions: Sequence[str], reasons: Sequence[str],
                       unfamiliarity: np.ndarray | None, sources: Sequence[str] | None,
                       share: float) -> tuple[list[str], list[str], list[SourceVerdict]]:
    """Decisions and reasons after the source rule, and the sources it judged unfamiliar.

    The unfamiliar rule calls at most about 2% of slides like the training ones unfamiliar.
    When far more than that of one source (a site, a scanner: the SOURCE column; without one,
    the whole deploy) is unfamiliar, its slides come from a world the model was not trained on,
    and the ones that happen to look familiar are the tail of that world, not slides the model
    knows: they are Undecided too (reason 'unfamiliar source'). A source is judged on its
    slides with tissue and an unfamiliarity; sources with fewer than MIN_SOURCE_SLIDES of them
    are pooled and judged together. A group is unfamiliar when more than ``share`` of its slides
    are, and so many would be unlikely among ordinary slides (SOURCE_EVIDENCE): a few slides
    are judged only on strong evidence. ``share`` 1 turns the rule off."""
    decisions, reasons = list(decisions), list(reasons)
    if unfamiliarity is None or share >= 1 or not len(decisions):
        return decisions, reasons, []
    u = np.asarray(unfamiliarity, dtype=float)
    judged = _judged(u, reasons)
    names = np.array([""] * len(decisions) if sources is None else [str(s) for s in sources],
                     dtype=object)
    counts = {name: int((judged & (names == name)).sum()) for name in set(names)}
    groups = np.array([n if counts[n] >= MIN_SOURCE_SLIDES or sources is None else POOLED
                       for n in names], dtype=object)
    verdicts = []
    for name in sorted(set(groups)):
        members = judged & (groups == name)
        n, k = int(members.sum()), int((u[members] > 1.0).sum())
        if not _telling(k, n, share, ORDINARY_UNFAMILIAR):
            continue
        verdict = SourceVerdict(name, n, k / n)
        verdicts.append(verdict)
        for i in np.flatnonzero(members):  # (not the unreadable rows: they have no decision)
            if decisions[i] != UNDECIDED:
                decisions[i], reasons[i] = UNDECIDED, UNFAMILIAR_SOURCE
    return decisions, reasons, verdicts


@dataclass(frozen=True)
class LookShift:
    """How many of a deploy's slides with tissue (``judged``) look beyond 99% of the model's
    training and validation slides (``beyond``)."""

    beyond: int
    judged: int


def look_shift(look: np.ndarray | None, reasons: Sequence[str], margin: float
               ) -> LookShift | None:
    """A LookShift where the deploy as a whole looks unlike the model's training and
    validation slides (another stain, scanner or rendering; LOOK_SHIFTED), else None. ``look``
    is the look part of the unfamiliarity (score / (its 99th percentile x ``margin``), the look
    part's margin), so a slide lies beyond the percentile where ``look`` x ``margin`` is above
    1; slides without tissue are not judged. None also without a look part (a model file older
    than it)."""
    if look is None:
        return None
    u = np.asarray(look, dtype=float)
    judged = _judged(u, reasons)
    n, k = int(judged.sum()), int((u[judged] * margin > 1.0).sum())
    return LookShift(k, n) if _telling(k, n, LOOK_SHIFTED, LOOK_ORDINARY) else None


def _judged(values: np.ndarray, reasons: Sequence[str]) -> np.ndarray:
    """The rows a deploy is judged on: a value (not unreadable) and tissue."""
    return np.isfinite(values) & (np.asarray(reasons, dtype=object) != NO_TISSUE)


def _telling(k: int, n: int, share: float, ordinary: float) -> bool:
    """Whether ``k`` of ``n`` judged slides beyond a threshold say something about the group:
    more than ``share`` of them, and so many would be unlikely (SOURCE_EVIDENCE) where at most
    ``ordinary`` of ordinary slides are."""
    from scipy import stats

    return bool(n) and k / n > share and stats.binom.sf(k - 1, n, ordinary) < SOURCE_EVIDENCE


def threshold_for_accuracy(probs: np.ndarray, y: np.ndarray, target: float,
                           min_decided: int = 1) -> float | None:
    """Smallest threshold at which accuracy among decided cases reaches ``target`` while
    deciding at least ``min_decided`` cases (None if never)."""
    probs = np.asarray(probs, dtype=float)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y)
    order = np.argsort(-conf, kind="stable")
    conf_sorted, corr_sorted = conf[order], correct[order]
    cum_acc = np.cumsum(corr_sorted) / np.arange(1, len(order) + 1)
    # decide the k most confident cases; ties in confidence must be decided together
    best = None
    for k in range(len(order), max(min_decided, 1) - 1, -1):
        if k < len(order) and conf_sorted[k] == conf_sorted[k - 1]:
            continue
        if cum_acc[k - 1] >= target:
            best = float(conf_sorted[k - 1])
            break
    return best


def suggest_threshold(probs: np.ndarray, y: np.ndarray, target: float,
                      min_decided: int = MIN_DECIDED_FOR_SUGGESTION) -> dict:
    """A threshold reaching ``target`` accuracy among decided cases, with what it decides:
    {target, threshold (None when no threshold deciding ``min_decided`` cases reaches it),
    decided, total, coverage}."""
    probs = np.asarray(probs, dtype=float)
    t = threshold_for_accuracy(probs, y, target, min_decided) if len(probs) else None
    decided = int((probs.max(axis=1) >= t).sum()) if t is not None else 0
    return {"target": target, "threshold": t, "decided": decided, "total": len(probs),
            "coverage": decided / len(probs) if t is not None else None,
            "min_decided": min_decided}


def upper_bound(events: int, n: int, confidence: float) -> float:
    """The one-sided Clopper-Pearson upper bound of a share seen as ``events`` of ``n``."""
    from scipy import stats

    if n <= 0 or events >= n:
        return 1.0
    return float(stats.beta.ppf(confidence, events + 1, n - events))


ERROR_CONFIDENCE = 0.95  # target_error's promise holds with this confidence


def threshold_for_error(probs: np.ndarray, y: np.ndarray, target: float,
                        min_decided: int = MIN_DECIDED_FOR_SUGGESTION) -> float | None:
    """The lowest threshold whose decided cases are wrong at most ``target`` of the time with
    ERROR_CONFIDENCE (Clopper-Pearson). Thresholds are tested from the highest down and the
    test stops at the first that fails (fixed-sequence testing, so the many thresholds tried
    need no correction); the first tested decides as many cases as a bound of ``target`` needs
    with none wrong (59 for 5%), and at least ``min_decided``. None where that one fails."""
    conf = np.asarray(probs, dtype=float).max(axis=1)
    wrong = np.asarray(probs).argmax(axis=1) != np.asarray(y)
    order = np.argsort(-conf, kind="stable")
    conf, wrong = conf[order], np.cumsum(wrong[order])
    needed = math.ceil(math.log(1 - ERROR_CONFIDENCE) / math.log1p(-target)) if 0 < target < 1 \
        else 1
    best = None
    for k in range(max(min_decided, needed, 1), len(order) + 1):
        if k < len(order) and conf[k] == conf[k - 1]:
            continue  # ties in confidence are decided together
        if upper_bound(int(wrong[k - 1]), k, ERROR_CONFIDENCE) > target:
            break
        best = float(conf[k - 1])
    return best


def error_support(decisions: Sequence[str], labels: Sequence[str]) -> tuple[int, int, float]:
    """What labelled slides support: (wrong, decided, the 95% upper bound of the share wrong)."""
    decided = [(d, t) for d, t in zip(decisions, labels) if d != UNDECIDED]
    wrong = sum(d != t for d, t in decided)
    return wrong, len(decided), upper_bound(wrong, len(decided), ERROR_CONFIDENCE)


@dataclass(frozen=True)
class Threshold:
    """The probability threshold in force and the reason for it, as the report prints it."""

    value: float | None
    reason: str


def threshold_in_force(*, given: float | None = None, target_accuracy: float | None = None,
                       val_probs: np.ndarray | None = None, val_y: np.ndarray | None = None,
                       stored: Sequence[float | None] = (), table: Sequence[float] = (),
                       default: float | None = DEFAULT_THRESHOLD,
                       target_error: float | None = None) -> Threshold:
    """The one rule for the threshold, first that applies:

    0. ``target_error`` (training): threshold_for_error on the validation split (1.0 when
       none holds: everything Undecided);
    1. ``target_accuracy`` (training): the smallest threshold reaching it on the validation
       split (1.0 when none does: everything Undecided);
    2. ``given``: the experiment file's prediction_threshold (or evaluate's --threshold);
    3. ``stored``: the thresholds in the model files (their median for an ensemble);
    4. ``table``: the threshold column of a predictions table (its median);
    5. ``default``.
    """
    if target_error is not None and val_probs is not None and val_y is not None:
        chosen = threshold_for_error(val_probs, val_y, target_error)
        promise = (f"at most {target_error:.1%} of decided validation slides wrong with "
                   f"{ERROR_CONFIDENCE:.0%} confidence (target_error)")
        if chosen is None:
            log.warning("no threshold gives %s; every case is Undecided (threshold 1.0): more "
                        "validation slides or a larger target_error", promise)
            return Threshold(1.0, f"no threshold gives {promise}")
        log.info("threshold %.4f: %s", chosen, promise)
        return Threshold(chosen, f"the lowest giving {promise}")
    if target_accuracy is not None and val_probs is not None and val_y is not None:
        chosen = threshold_for_accuracy(val_probs, val_y, target_accuracy)
        if chosen is None:
            log.warning("target_accuracy %.3f is not reached on the validation data at any "
                        "threshold; every case would be Undecided (threshold 1.0)",
                        target_accuracy)
            return Threshold(1.0, f"target_accuracy {target_accuracy:.3f} not reached on the "
                                  "validation split")
        log.info("threshold %.4f reaches accuracy %.3f on the validation data", chosen,
                 target_accuracy)
        return Threshold(chosen, f"reaches target_accuracy {target_accuracy:.3f} on the "
                                 "validation split")
    if given is not None:
        return Threshold(float(given), "prediction_threshold in the experiment file")
    known = [float(t) for t in stored if t is not None]
    if known:
        return Threshold(float(np.median(known)), "stored in the model file"
                         + ("s (median)" if len(known) > 1 else ""))
    column = [float(t) for t in table if t == t]
    if column:
        return Threshold(float(np.median(column)), "the threshold column of the table")
    return Threshold(default, "default")

