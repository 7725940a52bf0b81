"""Why slides are Undecided, which part of the unfamiliar-slide rule fired, and how each
source (site, scanner, collection) fared: the report's "Undecided: why" section.

Slides from one site tend to fail together, so a table with a SOURCE column gets coverage and
accuracy among decided per source (here and, for labelled tables, in metrics.csv).
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from thumbclf.core import layout, table
from thumbclf.core.decide import (LOW_CONFIDENCE, NO_TISSUE, UNDECIDED, UNFAMILIAR,
                                  UNFAMILIAR_SOURCE)
from thumbclf.outputs import plots, report

PARTS = ((table.UNFAMILIAR_CONTENT, "content"), (table.UNFAMILIAR_LOOK, "look"))


def fired(df: pd.DataFrame) -> list[str]:
    """Which part of the unfamiliar-slide rule fired for each row: 'content', 'look',
    'content and look', or '' (below 1, or a table without the parts)."""
    marks = [(table.signal(df, col), name) for col, name in PARTS]
    out = []
    for i in range(len(df)):
        names = [name for values, name in marks if values is not None and values[i] > 1.0]
        out.append(" and ".join(names))
    return out


def reason_counts(df: pd.DataFrame) -> dict[str, int]:
    """Undecided rows by reason, unfamiliar ones split by the part that fired."""
    reasons = (df[table.REASON].fillna("").astype(str) if table.REASON in df.columns
               else pd.Series([""] * len(df), index=df.index))
    undecided = (df[table.DECISION].astype(str) == UNDECIDED).to_numpy()
    counts = {NO_TISSUE: int((undecided & (reasons == NO_TISSUE)).sum())}
    parts = np.array(fired(df), dtype=object)
    unfamiliar = undecided & (reasons == UNFAMILIAR).to_numpy()
    for name in ("content", "look", "content and look"):
        counts[f"{UNFAMILIAR} ({name})"] = int((unfamiliar & (parts == name)).sum())
    counts[UNFAMILIAR] = int((unfamiliar & (parts == "")).sum())  # a table without the parts
    counts[UNFAMILIAR_SOURCE] = int((undecided & (reasons == UNFAMILIAR_SOURCE)).sum())
    counts[LOW_CONFIDENCE] = int((undecided & ((reasons == LOW_CONFIDENCE) | (reasons == ""))
                                  ).sum())
    return counts


def by_source(df: pd.DataFrame) -> pd.DataFrame | None:
    """Per source: slides, coverage, Undecided by reason and, with labels, accuracy among
    decided; None without a SOURCE column of two or more sources."""
    if table.SOURCE not in df.columns or df[table.SOURCE].nunique() < 2:
        return None
    rows = {}
    for source, part in df.groupby(table.SOURCE, sort=True):
        decided = part[table.DECISION].astype(str) != UNDECIDED
        row = {"slides": len(part), "coverage": float(decided.mean())}
        row.update({f"Undecided: {k}": v for k, v in reason_counts(part).items() if v})
        if table.LABEL in part.columns:
            right = part.loc[decided, table.DECISION].astype(str) == part.loc[decided, table.LABEL]
            row["accuracy (decided)"] = float(right.mean()) if decided.any() else float("nan")
        rows[str(source) or "(none)"] = row
    out = pd.DataFrame(rows).T.fillna(0)
    out.index.name = "source"
    for col in out.columns:
        if col == "slides" or col.startswith("Undecided"):
            out[col] = out[col].astype(int)
    return out


def section(df: pd.DataFrame, out: Path, load, k: int = 12) -> list[tuple[str, str]]:
    """The report's section on Undecided slides: counts by reason and part, the galleries of
    slides without tissue and of the most unfamiliar ones, and the per-source table."""
    counts = reason_counts(df)
    if not any(counts.values()) and by_source(df) is None:
        return []
    listed = "".join(f"<li>{html.escape(name)}: <b>{n}</b></li>" for name, n in counts.items()
                     if n)
    parts = [f"<p>Undecided slides by reason (the undecided_reason column; for unfamiliar "
             "slides, the part of the rule that fired: <i>content</i> = what the slide shows, "
             "<i>look</i> = its stain, glass, tissue and texture; <i>unfamiliar source</i> = "
             "most slides of its source were unfamiliar, so the model does not fit that source "
             "at all):</p><ul>"
             f"{listed or '<li>none</li>'}</ul>"]
    reasons = df[table.REASON].fillna("").astype(str) if table.REASON in df.columns else None
    if reasons is not None and (reasons == NO_TISSUE).any():
        items = [_item(df, i, f"tissue {_fraction(df, i)}")
                 for i in np.flatnonzero((reasons == NO_TISSUE).to_numpy())[:k]]
        fig = plots.gallery(items, out / layout.PLOTS / layout.FIG_NO_TISSUE,
                            "No tissue (blank, pen or label only)", load)
        parts.append(report.img(fig, "slides without tissue"))
    unf = table.signal(df, table.UNFAMILIARITY)
    if unf is not None and np.isfinite(unf).any():
        marks = fired(df)
        idx = np.flatnonzero(np.isfinite(unf))
        idx = idx[np.argsort(-unf[idx], kind="stable")][:k]
        items = [_item(df, i, f"unfamiliarity {unf[i]:.2f}"
                       + (f" ({marks[i]})" if marks[i] else "")) for i in idx]
        fig = plots.gallery(items, out / layout.PLOTS / layout.FIG_UNFAMILIAR,
                            "Most unfamiliar slides (above 1: Undecided as unfamiliar)", load)
        parts.append(report.img(fig, "most unfamiliar slides"))
    sources = by_source(df)
    if sources is not None:
        parts.append("<p>Per source (the SOURCE column): slides from one site tend to fail "
                     "together.</p>" + report.table(sources))
    return [("Undecided: why", "".join(parts))]


def _fraction(df: pd.DataFrame, i: int) -> str:
    values = table.signal(df, table.TISSUE)
    return f"{values[i]:.1%}" if values is not None and np.isfinite(values[i]) else "?"


def _item(df: pd.DataFrame, i: int, note: str) -> dict:
    label = str(df[table.LABEL].iloc[i]) if table.LABEL in df.columns else ""
    return {"path": df[table.PATH].iloc[i], "label": label,
            "decision": str(df[table.DECISION].iloc[i]), "prob": 0.0, "note": note}
