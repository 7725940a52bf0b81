"""Numbers from a predictions table alone (no torch): AUROC, AP, coverage, accuracy, calibration,
selective prediction, confusion matrices, and seeded bootstrap confidence intervals.

Point estimates come from scikit-learn. The bootstrap draws resamples as integer weights
(how often each image, or each patient's images, is drawn) and evaluates the same
definitions as scikit-learn's roc_auc_score / average_precision_score on weighted data for
all resamples at once; tests check both paths agree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (average_precision_score, balanced_accuracy_score, f1_score,
                             roc_auc_score)

from thumbclf.core.decide import UNDECIDED, suggest_threshold
from thumbclf.core.table import DECISION, LABEL, PATIENT

ECE_BINS = 15
CHUNK = 100  # resamples evaluated together


# ---------------------------------------------------------------------------- weighted ROC/AP


def _cumulative(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray):
    """Weighted true/false positive counts at each distinct score, highest score first."""
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each tie group
    w = weights[:, order]
    pos = positive[order].astype(float)
    return np.cumsum(w * pos, axis=1)[:, last], np.cumsum(w * (1 - pos), axis=1)[:, last]


def weighted_auroc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC for each row of ``weights`` (resamples x images); NaN where a class is missing."""
    tp, fp = _cumulative(scores, positive, weights)
    P, N = tp[:, -1:], fp[:, -1:]
    tp0 = np.concatenate([np.zeros_like(P), tp], axis=1)
    fp0 = np.concatenate([np.zeros_like(N), fp], axis=1)
    area = np.sum(np.diff(fp0, axis=1) * (tp0[:, 1:] + tp0[:, :-1]) / 2, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = area / (P[:, 0] * N[:, 0])
    out[(P[:, 0] == 0) | (N[:, 0] == 0)] = np.nan
    return out


def weighted_ap(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision (step-wise, as scikit-learn) for each row of ``weights``."""
    tp, fp = _cumulative(scores, positive, weights)
    P = tp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = tp / P
    recall0 = np.concatenate([np.zeros_like(P), recall], axis=1)
    out = np.sum(np.diff(recall0, axis=1) * precision, axis=1)
    out[P[:, 0] == 0] = np.nan
    return out


def bootstrap_weights(n: int, groups: np.ndarray | None, resamples: int,
                      seed: int) -> np.ndarray:
    """(resamples x n) counts: images drawn with replacement, or whole patients if grouped."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.multinomial(n, np.full(n, 1 / n), size=resamples).astype(float)
    uniq, inv = np.unique(groups, return_inverse=True)
    g = rng.multinomial(len(uniq), np.full(len(uniq), 1 / len(uniq)), size=resamples)
    return g[:, inv].astype(float)


def _ci(values: np.ndarray) -> list[float | None]:
    v = values[np.isfinite(values)]
    if len(v) < 10:
        return [None, None]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]


# ---------------------------------------------------------------------------- point metrics


def _safe(fn, *args, **kwargs) -> float | None:
    """A scikit-learn metric, or None where it is undefined for this data."""
    try:
        with warnings.catch_warnings():  # e.g. "a single label was found": reported as notes
            warnings.simplefilter("ignore", UserWarning)
            v = float(fn(*args, **kwargs))
        return v if math.isfinite(v) else None
    except ValueError:
        return None


def expected_calibration_error(conf: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
                               ) -> tuple[float | None, list[dict]]:
    """ECE with equal-width confidence bins, and the bins for a reliability diagram."""
    if len(conf) == 0:
        return None, []
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            acc, cf = float(correct[m].mean()), float(conf[m].mean())
            ece += m.mean() * abs(acc - cf)
            table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(m.sum()),
                          "accuracy": acc, "confidence": cf})
    return float(ece), table


def selective(conf: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
    """Accuracy and coverage by threshold, area under the risk-coverage curve."""
    grid = np.round(np.linspace(0, 1, 101), 2)
    curve = []
    for t in grid:
        m = conf >= t
        curve.append({"threshold": float(t), "coverage": float(m.mean()) if len(m) else 0.0,
                      "accuracy": float(correct[m].mean()) if m.any() else None})
    order = np.argsort(-conf, kind="stable")
    risk = 1 - np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    aurc = float(risk.mean()) if len(risk) else None
    return {"curve": curve, "aurc": aurc}


def _binary_or_multi_auc(y: np.ndarray, probs: np.ndarray, present: list[int], how: str):
    """Macro AUROC over the classes present (probabilities renormalised over them)."""
    if len(present) < 2:
        return None
    sub = probs[:, present]
    sub = sub / np.clip(sub.sum(axis=1, keepdims=True), 1e-12, None)
    mask = np.isin(y, present)
    yy = np.searchsorted(present, y[mask])
    if len(present) == 2:
        return _safe(roc_auc_score, yy == 1, sub[mask, 1])
    return _safe(roc_auc_score, yy, sub[mask], multi_class=how, average="macro",
                 labels=list(range(len(present))))


def _macro_ovo_weighted(y, probs, present, W):
    vals = []
    for a_i, a in enumerate(present):
        for b in present[a_i + 1:]:
            m = (y == a) | (y == b)
            a_vs_b = weighted_auroc(probs[m, a], y[m] == a, W[:, m])
            b_vs_a = weighted_auroc(probs[m, b], y[m] == b, W[:, m])
            vals.append((a_vs_b + b_vs_a) / 2)  # Hand & Till, as scikit-learn's 'ovo' 
    return _nanmean(np.vstack(vals)) if vals else np.full(W.shape[0], np.nan)


def _nanmean(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
        return np.nanmean(a, axis=0)


@dataclass
class Metrics:
    """Every figure of one labelled predictions table; None where it cannot be computed.
    ``as_dict()`` is what metrics.json holds, per scope."""

    n: int
    threshold: float | None
    classes: list[str]
    per_class: list[dict[str, Any]]  # class, n, auroc(_ci), average_precision(_ci), ...
    macro_auroc_ovr: float | None
    macro_auroc_ovo: float | None
    macro_auroc_ovr_ci: list
    macro_auroc_ovo_ci: list
    coverage: float | None
    accuracy_decided: float | None
    balanced_accuracy_decided: float | None
    accuracy_all: float | None
    macro_f1: float | None
    accuracy_top1: float | None
    ece: float | None
    reliability: list[dict[str, Any]]
    selective: list[dict[str, Any]]
    aurc: float | None
    threshold_for_95: float | None
    threshold_for_99: float | None
    notes: list[str]
    # each suggested threshold with what it decides (decide.suggest_threshold); a threshold is
    # suggested only where it decides MIN_DECIDED_FOR_SUGGESTION labelled slides or more
    suggestions: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compute(df: pd.DataFrame, classes: list[str] | tuple[str, ...], *,
            resamples: int = 1000, seed: int = 1) -> Metrics:
    """All metrics of a labelled predictions table (rows with errors must be removed)."""
    classes = list(classes)
    probs = df[classes].to_numpy(dtype=float)
    labels = df[LABEL].astype(str).to_numpy()
    known = np.isin(labels, classes)
    y = np.array([classes.index(v) if v in classes else -1 for v in labels])
    decisions = df[DECISION].astype(str).to_numpy()
    n = len(df)
    decided = decisions != UNDECIDED
    conf = probs.max(axis=1) if n else np.zeros(0)
    correct = (probs.argmax(axis=1) == y) if n else np.zeros(0, bool)
    dec_correct = decisions == labels
    notes = _data_notes(classes, labels, known, y)
    present = [i for i in range(len(classes)) if (y == i).any()]
    groups = df[PATIENT].astype(str).to_numpy() if PATIENT in df.columns else None
    W = bootstrap_weights(n, groups, resamples, seed) if resamples and n else np.zeros((0, n))
    macro = _macro_aurocs(y, probs, present, W)
    if len(present) < len(classes) and len(present) >= 2:
        notes.append("macro AUROC is over the classes present in the data only")
    ece, bins = expected_calibration_error(conf, correct)
    sel = selective(conf, correct)
    suggestions = [suggest_threshold(probs[known], y[known], t) for t in (0.95, 0.99)]
    return Metrics(
        n=int(n), threshold=None, classes=classes,
        per_class=[_class_row(c, y == i, probs[:, i], decisions, W) for i, c in enumerate(classes)],
        **macro,
        coverage=float(decided.mean()) if n else None,
        accuracy_decided=float(dec_correct[decided].mean()) if decided.any() else None,
        balanced_accuracy_decided=(
            _safe(balanced_accuracy_score, labels[decided], decisions[decided].astype(str))
            if decided.any() else None),
        accuracy_all=float(dec_correct.mean()) if n else None,
        macro_f1=(_safe(f1_score, labels, decisions.astype(str),
                        labels=[classes[i] for i in present], average="macro", zero_division=0)
                  if present else None),
        accuracy_top1=float(correct.mean()) if n else None,
        ece=ece, reliability=bins, selective=sel["curve"], aurc=sel["aurc"],
        threshold_for_95=suggestions[0]["threshold"],
        threshold_for_99=suggestions[1]["threshold"],
        notes=notes, suggestions=suggestions)


def _data_notes(classes: list[str], labels: np.ndarray, known: np.ndarray,
                y: np.ndarray) -> list[str]:
    """What the report must say about the labels: unknown ones, absent and single classes."""
    notes = []
    if (~known).any():
        notes.append(f"{int((~known).sum())} images have labels the model does not know: "
                     f"{', '.join(sorted(set(labels[~known])))}; they count as errors")
    for i, c in enumerate(classes):
        cnt = int((y == i).sum())
        if cnt == 0:
            notes.append(f"class {c} is absent from the data: its AUROC, AP and sensitivity "
                         "cannot be computed")
        elif cnt == 1:
            notes.append(f"class {c} has a single image: its confidence intervals are unreliable")
    return notes


def _class_row(c: str, pos: np.ndarray, p: np.ndarray, decisions: np.ndarray,
               W: np.ndarray) -> dict[str, Any]:
    """One class against the rest: AUROC and AP (with bootstrap CIs), sensitivity, specificity."""
    n, npos = len(pos), int(pos.sum())
    tp = int((decisions[pos] == c).sum())
    tn = int((decisions[~pos] != c).sum())
    row = {"class": c, "n": npos,
           "auroc": _safe(roc_auc_score, pos, p) if 0 < npos < n else None,
           "average_precision": _safe(average_precision_score, pos, p) if npos else None,
           "sensitivity": tp / npos if npos else None,
           "specificity": tn / int((~pos).sum()) if (~pos).any() else None,
           "decided_as": int((decisions == c).sum())}
    row["auroc_ci"], row["average_precision_ci"] = [None, None], [None, None]
    if len(W) and row["auroc"] is not None:
        aucs, aps = [], []
        for k in range(0, len(W), CHUNK):
            aucs.append(weighted_auroc(p, pos, W[k:k + CHUNK]))
            aps.append(weighted_ap(p, pos, W[k:k + CHUNK]))
        row["auroc_ci"] = _ci(np.concatenate(aucs))
        row["average_precision_ci"] = _ci(np.concatenate(aps))
    return row


def _macro_aurocs(y: np.ndarray, probs: np.ndarray, present: list[int],
                  W: np.ndarray) -> dict[str, Any]:
    """Macro AUROC one-vs-rest and one-vs-one over the classes present, with bootstrap CIs."""
    out = {"macro_auroc_ovr": _binary_or_multi_auc(y, probs, present, "ovr"),
           "macro_auroc_ovo": _binary_or_multi_auc(y, probs, present, "ovo"),
           "macro_auroc_ovr_ci": [None, None], "macro_auroc_ovo_ci": [None, None]}
    if len(W) and out["macro_auroc_ovr"] is not None:
        ovr, ovo = [], []
        for k in range(0, len(W), CHUNK):
            w = W[k:k + CHUNK]
            per = np.vstack([weighted_auroc(probs[:, i], y == i, w) for i in present])
            ovr.append(_nanmean(per) if len(present) > 2 else per[-1])
            ovo.append(_macro_ovo_weighted(y, probs, present, w))
        out["macro_auroc_ovr_ci"] = _ci(np.concatenate(ovr))
        out["macro_auroc_ovo_ci"] = _ci(np.concatenate(ovo))
    return out


def confusion(df: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Counts: rows = true classes (``order``, then unknown labels), columns = decisions + Undecided."""
    labels = df[LABEL].astype(str)
    rows = list(order) + sorted(set(labels) - set(order))
    cm = pd.crosstab(labels, df[DECISION].astype(str)).reindex(
        index=rows, columns=list(order) + [UNDECIDED], fill_value=0).astype(int)
    cm.index.name, cm.columns.name = "true \\ decision", None
    return cm


def row_normalised(cm: pd.DataFrame) -> pd.DataFrame:
    """Each row divided by its total (a row of zeros stays zero)."""
    totals = cm.sum(axis=1).replace(0, 1)
    return cm.div(totals, axis=0)


def summary_rows(m: Metrics, scope: str) -> list[dict[str, Any]]:
    """Flat rows (scope, metric, class, value, ci_low, ci_high) for metrics.csv."""
    rows = []

    def add(metric, value, cls="", ci=(None, None)):
        rows.append({"scope": scope, "metric": metric, "class": cls, "value": value,
                     "ci_low": ci[0], "ci_high": ci[1]})

    add("n", m.n)
    add("macro_auroc_ovr", m.macro_auroc_ovr, ci=m.macro_auroc_ovr_ci)
    add("macro_auroc_ovo", m.macro_auroc_ovo, ci=m.macro_auroc_ovo_ci)
    for key in ("coverage", "accuracy_decided", "balanced_accuracy_decided", "accuracy_all",
                "macro_f1", "ece", "aurc", "threshold_for_95", "threshold_for_99"):
        add(key, getattr(m, key))
    for sug in m.suggestions:  # what each suggested threshold decides
        add(f"coverage_at_threshold_for_{round(sug['target'] * 100)}", sug["coverage"])
    for r in m.per_class:
        add("auroc", r["auroc"], r["class"], r["auroc_ci"])
        add("average_precision", r["average_precision"], r["class"], r["average_precision_ci"])
        add("sensitivity", r["sensitivity"], r["class"])
        add("specificity", r["specificity"], r["class"])
    return rows
