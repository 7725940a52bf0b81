"""The report's first section, for the pathologist: what was sorted where, how many slides need a
look (and the command that shows them), and how good the model is on labelled slides."""

from __future__ import annotations

import html
import shlex
from pathlib import Path

import pandas as pd

from thumbclf.core import layout
from thumbclf.core.decide import NO_TISSUE, UNDECIDED, UNFAMILIAR, UNFAMILIAR_SOURCE
from thumbclf.core.table import DECISION, ERROR, REASON
from thumbclf.outputs.metrics import Metrics

# one-line glosses of the report's terms (shown under the figures that use them)
GLOSSES = {
    "AUROC": "how well the probabilities separate the classes: 1 is perfect, 0.5 is chance",
    "ovo / ovr": "one-vs-one averages over every pair of classes; one-vs-rest takes each class "
                 "against all others",
    "ECE": "expected calibration error: the average gap between the stated probability and "
           "the share that is right; 0 is perfect",
    "AURC": "area under the risk-coverage curve: the average error as more slides are left "
            "Undecided; lower is better",
    "coverage": "the share of slides decided (not Undecided)",
}


def glossary(*terms: str) -> str:
    """A short list of what the named terms mean."""
    items = "".join(f"<li><b>{html.escape(t)}</b>: {html.escape(GLOSSES[t])}</li>" for t in terms)
    return f"<ul class=muted>{items}</ul>"


def review_command(folder: Path) -> str:
    """The exact command that opens the review page of ``folder``, as HTML."""
    return f"<code>{html.escape(shlex.join(['thumbclf', 'review', str(folder)]))}</code>"


def _decision_counts(table: pd.DataFrame) -> tuple[pd.Series, int, int]:
    """Decided counts per class (most first), the Undecided count and the unreadable count."""
    errors = table[ERROR].fillna("").astype(str) != "" if ERROR in table else pd.Series(
        False, index=table.index)
    decisions = table.loc[~errors, DECISION].astype(str)
    counts = decisions[decisions != UNDECIDED].value_counts()
    return counts, int((decisions == UNDECIDED).sum()), int(errors.sum())


def decisions_lines(table: pd.DataFrame, *, review: Path | None,
                    sorted_into: Path | None = None, failures: int = 0) -> list[str]:
    """What was decided (and sorted where), and how many slides need a look; ``failures``:
    unreadable slides left out of ``table``."""
    counts, undecided, unreadable = _decision_counts(table)
    unreadable += failures
    total = len(table) + failures
    decided = int(counts.sum())
    per_class = ", ".join(f"{html.escape(str(c))} {n}" for c, n in counts.items()) or "none"
    lines = [f"<b>{total}</b> slides: <b>{decided}</b> decided ({per_class})"
             + (f", copied into <code>{html.escape(str(sorted_into))}/&lt;class&gt;/</code>"
                if sorted_into is not None else "") + "."]
    if undecided:
        look = f"<b>{undecided}</b> Undecided: they need a look"
        if review is not None:
            look += f"; work through them with {review_command(review)}"
        lines.append(look + ".")
    else:
        lines.append("No slide is Undecided.")
    lines += _trust_lines(table)
    if unreadable:
        lines.append(f"<b>{unreadable}</b> could not be read (the error column of "
                     f"{layout.PREDICTIONS} says why).")
    return lines


def _trust_lines(table: pd.DataFrame) -> list[str]:
    """Why slides are Undecided, where the answer matters more than the counts: a source the
    model does not fit, slides without tissue (issue 28)."""
    if REASON not in table:
        return []
    reasons = table[REASON].fillna("").astype(str)
    unfamiliar, by_source = int((reasons == UNFAMILIAR).sum()), int(
        (reasons == UNFAMILIAR_SOURCE).sum())
    lines = []
    if by_source:
        lines.append(f"<b>The model does not fit these slides</b>: {unfamiliar} look like nothing "
                     "it was trained on (it calls about 2% of slides like its training ones so), "
                     f"so {by_source} more of the same source are Undecided too (reason "
                     "'unfamiliar source'; see <i>Undecided: why</i>).")
    blank = int((reasons == NO_TISSUE).sum())
    if blank:
        lines.append(f"<b>{blank}</b> show no tissue (blank, pen or label only).")
    return lines


def quality_lines(m: Metrics) -> list[str]:
    """How good the model is on the labelled slides, in words."""
    def pct(v):
        return "–" if v is None else f"{v:.0%}"

    at = f" at the threshold {m.threshold:.2f}" if m.threshold is not None else ""
    lines = [f"On the {m.n} labelled slides, <b>{pct(m.accuracy_decided)}</b> of the decided "
             f"ones are right; {pct(m.coverage)} are decided{at}; counting Undecided as wrong, "
             f"{pct(m.accuracy_all)} are right."]
    if m.macro_auroc_ovr is not None:
        lines.append(f"Separation of the classes (macro AUROC, 1 is perfect, 0.5 chance): "
                     f"{m.macro_auroc_ovr:.3f}.")
    return lines


def section(lines: list[str], caveats: list[str] = ()) -> str:
    """The summary section's HTML: a list of plain sentences, then the caveats of the data."""
    body = "<ul class=summary>" + "".join(f"<li>{line}</li>" for line in lines) + "</ul>"
    if caveats:
        body += "".join(f"<div class=note>{html.escape(c)}</div>" for c in caveats)
    return body
