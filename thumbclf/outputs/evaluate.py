"""Evaluate a predictions table: metrics.json/csv, confusion matrices, plots and report.html.

Also a command: ``python -m thumbclf.evaluate PREDICTIONS.csv [--threshold T] [--output DIR]``
recomputes everything from a predictions table alone.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from thumbclf.core import layout, table
from thumbclf.core.decide import (ERROR_CONFIDENCE, NO_TISSUE, UNDECIDED, UNFAMILIAR_SOURCE,
                                  decide_with_reasons, error_support, threshold_in_force)
from thumbclf.core.errors import ImageReadError
from thumbclf.core.files import atomic_csv, atomic_text
from thumbclf.inputs.decode import load_array
from thumbclf.inputs.images import Preprocessing
from thumbclf.outputs import metrics as M
from thumbclf.outputs import plots, report
from thumbclf.outputs.reasons import section as reasons_section
from thumbclf.outputs import summary as plain
from thumbclf.core.table import DECISION, ERROR, LABEL, PATH, PATIENT

log = logging.getLogger(__name__)


def thumb_loader(size: int = 160, slide_size: int = 512, slide_cache: Path | None = None,
                  slide_budget_s: float | None = None):
    """Small images for galleries; slides come from the run's thumbnail cache when given, and
    are read within the run's per-slide budget where they are not in it."""
    prep = Preprocessing(size=size, slide_size=slide_size,
                         **({} if slide_budget_s is None else {"slide_budget_s": slide_budget_s}))

    def load(path: str):
        try:
            return load_array(Path(path), prep, slide_cache=slide_cache)
        except (ImageReadError, OSError):
            return None

    return load


def _gallery_items(df: pd.DataFrame, classes: list[str], errors: bool, k: int = 12) -> list[dict]:
    probs = df[classes].to_numpy(dtype=float)
    top = probs.max(axis=1)
    dec = df[DECISION].astype(str).to_numpy()
    lab = df[LABEL].astype(str).to_numpy() if LABEL in df else np.array([""] * len(df))
    if errors:
        mask = (dec != UNDECIDED) & (dec != lab)
    else:
        mask = dec == UNDECIDED
    idx = np.flatnonzero(mask)
    idx = idx[np.argsort(-top[idx], kind="stable")][:k]
    why = (df[table.REASON].fillna("").astype(str).to_numpy() if table.REASON in df.columns
           else np.array([""] * len(df)))
    best = np.array(classes)[probs.argmax(axis=1)] if len(df) else np.array([])
    return [{"path": df[PATH].iloc[i], "label": lab[i], "decision": dec[i], "prob": float(top[i]),
             "note": _gallery_note(dec[i], best[i], float(top[i]), why[i])} for i in idx]


def _gallery_note(decision: str, best: str, top: float, why: str) -> str:
    """An Undecided slide shows its best guess (and why it is Undecided); an error its
    probability."""
    if decision == UNDECIDED:
        return f"best guess {best} {top:.2f}" + (f", {why}" if why else "")
    return f"{top:.2f}, {why}" if why else ""


def _data_summary(df: pd.DataFrame, classes: list[str], split_df: pd.DataFrame | None,
                  failures: int) -> str:
    counts = df[LABEL].astype(str).value_counts()
    rows = pd.DataFrame({"images": [int(counts.get(c, 0)) for c in classes]}, index=classes)
    if PATIENT in df.columns:
        rows["patients"] = [df.loc[df[LABEL] == c, PATIENT].nunique() for c in classes]
    parts = [report.table(rows)]
    if split_df is not None and LABEL in split_df.columns:
        piv = split_df.assign(where=lambda d: d["fold"].map(layout.fold_label)
                              + " " + d["role"])
        parts.append("<p>Images per class in each fold (train / validation / test):</p>")
        counts = pd.crosstab(piv[LABEL], piv["where"])
        counts.index.name, counts.columns.name = "class", None
        parts.append(report.table(counts))
    if failures:
        parts.append(f"<div class=note>{failures} images could not be read; see the error "
                     "column of predictions.csv and run.log.</div>")
    return "".join(parts)


@dataclass(frozen=True)
class ReportSpec:
    """How one run's report is written (issue 32: one spec instead of a dozen keywords).

    ``order``, ``xt`` and ``yt``: the confusion matrix's rows and tick labels (``cm_layout``);
    ``resamples`` and ``seed``: the bootstrap; ``title``, ``kind`` and ``params``: the page's
    heading and its settings table; ``extra_sections`` and ``notes``: added to the page;
    ``thumbs``: the gallery's picture loader (None: a plain one); ``review`` and
    ``sorted_into``: the results folder and sorted folder the summary names; ``advice``:
    plain sentences for the summary, after the decisions (what to try next)."""

    order: Sequence[str] = ()
    xt: Sequence[str] = ()
    yt: Sequence[str] = ()
    resamples: int = 0
    seed: int = 1
    title: str = "thumbclf"
    kind: str = "evaluation"
    params: dict[str, Any] = field(default_factory=dict)
    extra_sections: Sequence[tuple[str, str]] = ()
    notes: Sequence[str] = ()
    thumbs: Callable | None = None
    review: Path | None = None
    sorted_into: Path | None = None
    advice: Sequence[str] = ()

    def loader(self) -> Callable:
        """The gallery's picture loader."""
        return self.thumbs or thumb_loader()


def evaluate_table(df: pd.DataFrame, classes: list[str], out: Path, spec: ReportSpec, *,
                   threshold: float | None, histories: dict[str, pd.DataFrame] | None = None,
                   split_df: pd.DataFrame | None = None, failures: int = 0) -> dict[str, Any]:
    """Write metrics, confusion matrices, plots and the report for one labelled table, as
    ``spec`` says; ``threshold``: decide again at this threshold (None: the table's decisions);
    ``split_df``: the splits with their labels; ``failures``: the unreadable rows."""
    resamples, seed = spec.resamples, spec.seed
    if threshold is not None:  # the tissue and unfamiliar rules still hold (their columns)
        decisions, reasons = decide_with_reasons(df[classes].to_numpy(float), classes, threshold,
                                                 table.signal(df, table.UNFAMILIARITY),
                                                 table.signal(df, table.TISSUE))
        judged = (df[table.REASON].astype(str) == UNFAMILIAR_SOURCE).to_numpy() if \
            table.REASON in df.columns else np.zeros(len(df), bool)  # a verdict on the source,
        for i in np.flatnonzero(judged):  # which no threshold changes
            if reasons[i] != NO_TISSUE:
                decisions[i], reasons[i] = UNDECIDED, UNFAMILIAR_SOURCE
        df = df.assign(**{table.DECISION: decisions, table.REASON: reasons})
    used = threshold_in_force(given=threshold, default=None,
                              table=df["threshold"] if "threshold" in df else ()).value
    m = M.compute(df, classes, resamples=resamples, seed=seed)
    m.threshold = used
    caveats = list(m.notes)  # about the data: shown in the summary
    m.notes = list(spec.notes) + m.notes
    scopes = {"all": m}
    if "fold" in df.columns and df["fold"].nunique() > 1:
        for f, part in df.groupby("fold"):
            scopes[f"fold {f}"] = M.compute(part, classes, resamples=resamples, seed=seed)
    if table.SOURCE in df.columns and df[table.SOURCE].nunique() > 1:  # slides of one site
        for src, part in df.groupby(table.SOURCE, sort=True):  # tend to fail together
            scopes[f"source {src or '(none)'}"] = M.compute(part, classes, resamples=0, seed=seed)
    cm = M.confusion(df, list(spec.order))
    atomic_csv(cm.reset_index(), out / layout.CONFUSION)
    atomic_csv(M.row_normalised(cm).reset_index(), out / layout.CONFUSION_NORMALISED)
    load = spec.loader()
    figs = _figures(df, classes, (m, cm), out / layout.PLOTS, spec, used=used,
                    histories=histories, load=load)
    atomic_text(json.dumps(_jsonable({k: v.as_dict() for k, v in scopes.items()}), indent=1),
                out / layout.METRICS_JSON)
    rows = [r for scope, mm in scopes.items() for r in M.summary_rows(mm, scope)]
    atomic_csv(pd.DataFrame(rows), out / layout.METRICS_CSV)
    sections = _sections(m, scopes, cm, figs, used=used, resamples=resamples,
                         patients=PATIENT in df.columns)
    sections += reasons_section(df, out, load)
    sections += list(spec.extra_sections)
    first = plain.section(plain.decisions_lines(df, review=spec.review,
                                                sorted_into=spec.sorted_into,
                                                failures=failures)
                          + [html.escape(a) for a in spec.advice] + plain.quality_lines(m),
                          caveats)
    report.write(out / layout.REPORT, title=spec.title, kind=spec.kind, params=spec.params,
                 data_summary=_data_summary(df, classes, split_df, failures),
                 sections=sections, notes=list(spec.notes), summary=first)
    log.info("macro AUROC %s (ovo) / %s (ovr); coverage %s; accuracy among decided %s; report %s",
             report.fmt(m.macro_auroc_ovo), report.fmt(m.macro_auroc_ovr),
             report.fmt(m.coverage, True), report.fmt(m.accuracy_decided, True),
             out / layout.REPORT)
    return m


def _figures(df: pd.DataFrame, classes: list[str], computed: tuple[M.Metrics, pd.DataFrame],
             pdir: Path, spec: ReportSpec, *, used: float | None, histories, load) -> dict:
    """The report's figures, as files under plots/; ``computed``: the metrics and the
    confusion matrix (whose rows past ``spec.order`` are labels without a class)."""
    m, cm = computed
    xt, yt = list(spec.xt), list(spec.yt) + list(cm.index[len(spec.order):])
    figs = {
        "confusion": plots.confusion_heatmap(cm, xt, yt, pdir / layout.FIG_CONFUSION,
                                             f"Confusion matrix (threshold {used:.2f})"
                                             if used is not None else "Confusion matrix"),
        "roc": plots.roc_curves(df, classes, m, pdir / layout.FIG_ROC),
        "selective": plots.selective_curve(m, used if used is not None else 0.0,
                                           pdir / layout.FIG_ACCURACY),
        "reliability": plots.reliability(m, pdir / layout.FIG_RELIABILITY),
    }
    if histories:
        figs["training"] = plots.training_curves(histories, pdir / layout.FIG_TRAINING)
    figs["errors"] = plots.gallery(_gallery_items(df, classes, True), pdir / layout.FIG_ERRORS,
                                   "Most confident errors", load)
    figs["undecided"] = plots.gallery(_gallery_items(df, classes, False),
                                      pdir / layout.FIG_UNDECIDED,
                                      "Undecided slides, with their best guess (highest first)",
                                      load)
    return figs


def threshold_notes(df: pd.DataFrame, target_accuracy: float | None,
                    target_error: float | None) -> list[str]:
    """The report's note on thresholds that a target chose: each fold's threshold, and for
    ``target_error`` what was promised beside what the validation slides support."""
    if target_accuracy is None and target_error is None:
        return []
    folds = df.groupby(table.FOLD) if table.FOLD in df else [(None, df)]
    parts = []
    for fold, rows in folds:
        part = f"{'fold ' + str(fold) + ' ' if fold is not None else ''}" \
               f"{float(rows[table.THRESHOLD].iloc[0]):.3f}"
        if target_error is not None and table.LABEL in rows:
            wrong, decided, bound = error_support(rows[table.DECISION].tolist(),
                                                  rows[table.LABEL].tolist())
            part += (f" ({wrong} wrong of {decided} decided; at most {bound:.1%} with "
                     f"{ERROR_CONFIDENCE:.0%} confidence)")
        parts.append(part)
    if target_error is not None:
        head = (f"Thresholds chosen so that at most {target_error:.1%} of decided validation "
                f"slides are wrong with {ERROR_CONFIDENCE:.0%} confidence (target_error, "
                "the same slides choose and check it, so read the figures as what these slides "
                "support, not as a guarantee for new ones): ")
    else:
        head = (f"Thresholds chosen to reach {target_accuracy:.1%} accuracy on each validation "
                "split (target_accuracy): ")
    return [head + ", ".join(parts) + "; the coverage they give is below."]


def threshold_text(m: M.Metrics, used: float | None) -> str:
    """The threshold in use and the suggested ones, each with the share of slides it decides;
    none where fewer than MIN_DECIDED_FOR_SUGGESTION labelled slides would be decided."""
    if used is None:
        return ""
    parts = []
    for s in m.suggestions:
        target = f"{s['target']:.0%} accuracy"
        if s["threshold"] is not None:
            parts.append(f"{s['threshold']:.3f} would reach {target} among decided slides, "
                         f"deciding {s['decided']} of {s['total']} ({s['coverage']:.0%})")
        elif s["total"] < s["min_decided"]:
            parts.append(f"no threshold is suggested for {target}: {s['total']} labelled "
                         f"slides are too few (at least {s['min_decided']} must be decided)")
        else:
            parts.append(f"no threshold reaches {target} while deciding at least "
                         f"{s['min_decided']} of the {s['total']} labelled slides")
    return (f"<p>Threshold in use: <b>{used:.3f}</b>. On this data: "
            + "; ".join(parts) + ".</p>")


def _sections(m: M.Metrics, scopes: dict[str, M.Metrics], cm: pd.DataFrame, figs: dict, *,
              used: float | None, resamples: int, patients: bool) -> list[tuple[str, str]]:
    """The report's sections of figures and tables (title, HTML)."""
    fold_table = ""
    if len(scopes) > 1:
        ft = pd.DataFrame({s: {"n": mm.n, "macro AUROC (ovo)": mm.macro_auroc_ovo,
                               "macro AUROC (ovr)": mm.macro_auroc_ovr,
                               "coverage": mm.coverage, "accuracy (decided)": mm.accuracy_decided,
                               "macro F1": mm.macro_f1} for s, mm in scopes.items()}).T
        ft["n"] = ft["n"].astype(int)
        fold_table = ("<p>Per fold (each fold's test images) and per source (the SOURCE "
                      "column); 'all' = pooled:</p>" + report.table(ft))
    thr_text = threshold_text(m, used)
    sections = [
        ("Results", report.cards(m) + plain.glossary("AUROC", "ovo / ovr", "coverage", "ECE",
                                                     "AURC") + thr_text + fold_table),
        ("Per class", report.per_class_table(m) +
         "<p class=muted>AUROC and average precision: one class vs the rest, from the "
         "probabilities; sensitivity and specificity: from the decisions (Undecided counts as "
         f"not that class). 95% CIs: {resamples} bootstrap resamples"
         f"{' of patients' if patients else ''}.</p>"),
        ("Confusion matrix", report.img(figs["confusion"], "confusion matrix") +
         report.table(cm)),
        ("ROC curves", report.img(figs["roc"], "ROC curves")),
        ("Undecided threshold", report.img(figs["selective"], "accuracy vs threshold")),
        ("Calibration", report.img(figs["reliability"], "reliability diagram")),
    ]
    if "training" in figs:
        sections.append(("Training curves", report.img(figs["training"], "training curves")))
    sections.append(("Where it goes wrong", (report.img(figs["errors"], "errors") or
                     "<p>No confident errors.</p>") + (report.img(figs["undecided"], "undecided")
                                                       or "<p>No Undecided slides.</p>")))
    return sections


def decisions_report(folder: Path, table: pd.DataFrame, spec: ReportSpec, *, classes,
                     failures: int) -> None:
    """Deploy without labels: the distribution of decisions, as a table, a plot and a report
    (``spec``: its title, settings, picture loader, extra sections, notes, sorted folder)."""
    thumbs = spec.loader()
    ok = table[table[ERROR] == ""]
    counts = ok[DECISION].value_counts().reindex(list(classes) + [UNDECIDED], fill_value=0)
    summary = pd.DataFrame({"decision": counts.index, "images": counts.to_numpy(),
                            "share": counts.to_numpy() / max(len(ok), 1)})
    atomic_csv(summary, folder / layout.DECISIONS)
    fig = plots.decision_bars(counts, folder / layout.PLOTS / layout.FIG_DECISIONS,
                              f"Decisions for {len(ok)} images")
    gallery = plots.gallery(_gallery_items(ok, list(classes), False),
                            folder / layout.PLOTS / layout.FIG_UNDECIDED,
                            "Undecided slides, with their best guess (highest first)", thumbs)
    data = f"<p>{len(table)} images, {failures} unreadable.</p>"
    if failures:
        data += ("<div class=note>Unreadable images keep their row in predictions.csv with the "
                 "reason in the error column.</div>")
    sections = [("Decisions", report.table(summary, index=False) + report.img(fig, "decisions")),
                ("Undecided", report.img(gallery, "undecided") or "<p>No Undecided slides.</p>")]
    sections += reasons_section(ok, folder, thumbs)
    first = plain.section(plain.decisions_lines(table, review=folder,
                                                sorted_into=spec.sorted_into)
                          + [html.escape(a) for a in spec.advice])
    report.write(folder / layout.REPORT, title=spec.title,
                 kind="Deployment without labels", params=spec.params,
                 data_summary=data, sections=sections + list(spec.extra_sections),
                 notes=list(spec.notes), summary=first)


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.integer):
        return int(o)
    return o

