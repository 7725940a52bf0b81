"""report.html: one self-contained page (images embedded) with params, data, metrics and plots."""

from __future__ import annotations

import base64
import datetime as dt
import html
import logging
import re
from pathlib import Path
from typing import Any

import pandas as pd

from thumbclf.core.files import atomic_text
from thumbclf.core.version import __version__
from thumbclf.outputs.metrics import Metrics

log = logging.getLogger(__name__)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #4a7ab8;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#eef3fa}td:first-child,th:first-child{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0}.card{border:1px solid #ccd;border-radius:8px;
padding:.6em 1em;min-width:150px;background:#fafcff}.card b{font-size:1.5em;display:block}
.card span{color:#555;font-size:.85em}.muted{color:#666;font-size:.9em}img{max-width:100%;margin:.5em 0}
.note{background:#fff8e5;border-left:4px solid #e0a800;padding:.4em .8em;margin:.4em 0}
details{margin:.5em 0}.toc{background:#f6f8fb;border:1px solid #dde;padding:.4em 1em;display:inline-block}
.toc ol{margin:.2em 0;padding-left:1.4em}.summary li{margin:.2em 0}
"""


def fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, float):
        return f"{v:.1%}" if pct else f"{v:.3f}"
    return html.escape(str(v))


def ci(v: Any, c: list | None) -> str:
    if v is None:
        return "–"
    if c and c[0] is not None:
        return f"{v:.3f} <span class=muted>[{c[0]:.3f}–{c[1]:.3f}]</span>"
    return f"{v:.3f}"


def img(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).is_file():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table(df: pd.DataFrame, index: bool = True) -> str:
    """A table; a missing value shows as a dash, never as NaN."""
    return df.to_html(index=index, border=0, float_format=lambda x: f"{x:.3f}", escape=True,
                      na_rep="–")


def cards(m: Metrics) -> str:
    items = [
        (ci(m.macro_auroc_ovo, m.macro_auroc_ovo_ci), "macro AUROC (one-vs-one)"),
        (ci(m.macro_auroc_ovr, m.macro_auroc_ovr_ci), "macro AUROC (one-vs-rest)"),
        (fmt(m.coverage, True), "coverage (not Undecided)"),
        (fmt(m.accuracy_decided, True), "accuracy among decided"),
        (fmt(m.accuracy_all, True), "accuracy, Undecided = wrong"),
        (fmt(m.balanced_accuracy_decided, True), "balanced accuracy (decided)"),
        (fmt(m.macro_f1), "macro F1"),
        (fmt(m.ece), "calibration error (ECE)"),
    ]
    return '<div class=cards>' + "".join(f"<div class=card><b>{v}</b><span>{k}</span></div>"
                                         for v, k in items) + "</div>"


def per_class_table(m: Metrics) -> str:
    rows = ["<table><tr><th>class</th><th>n</th><th>AUROC [95% CI]</th><th>average precision "
            "[95% CI]</th><th>sensitivity</th><th>specificity</th><th>decided as</th></tr>"]
    for r in m.per_class:
        rows.append(f"<tr><td>{html.escape(r['class'])}</td><td>{r['n']}</td>"
                    f"<td>{ci(r['auroc'], r['auroc_ci'])}</td>"
                    f"<td>{ci(r['average_precision'], r['average_precision_ci'])}</td>"
                    f"<td>{fmt(r['sensitivity'], True)}</td><td>{fmt(r['specificity'], True)}</td>"
                    f"<td>{r['decided_as']}</td></tr>")
    return "".join(rows) + "</table>"


def slug(heading: str, taken: set[str]) -> str:
    """An HTML id for a heading, unique in the page."""
    base = re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") or "section"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name


def technical(notes: list[str]) -> str:
    """Engineering notes (engine, verification, rules, calibration): collapsed, and in run.log."""
    for note in notes:
        log.debug("report note: %s", note)
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (f"<details><summary>{len(notes)} note{'s' * (len(notes) != 1)} on how this run "
            f"worked (also in run.log)</summary><ul>{items}</ul></details>")


def write(path: Path, *, title: str, kind: str, params: dict[str, Any], data_summary: str,
          sections: list[tuple[str, str]], notes: list[str], summary: str = "") -> Path:
    """Assemble and write the report atomically: the summary first, a table of contents, the
    sections in order, then the technical notes and the settings, collapsed."""
    now = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    params_rows = "".join(f"<tr><td>{html.escape(k)}</td><td style='text-align:left'>"
                          f"{html.escape('–' if v != v else str(v))}</td></tr>"  # NaN: a dash
                          for k, v in params.items())
    parts = ([("Summary", summary)] if summary else []) + [("Data", data_summary)]
    parts += list(sections)
    if notes:
        parts.append(("Technical notes", technical(list(notes))))
    parts.append(("Settings", "<details><summary>all parameters (config.yaml)</summary>"
                              f"<table>{params_rows}</table></details>"))
    taken: set[str] = set()
    ids = [slug(heading, taken) for heading, _ in parts]
    toc = "".join(f'<li><a href="#{i}">{html.escape(h)}</a></li>' for i, (h, _) in zip(ids, parts))
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p class=muted>{html.escape(kind)} · thumbclf {__version__} · {now}</p>",
            f"<nav class=toc><b>Contents</b><ol>{toc}</ol></nav>"]
    for i, (heading, content) in zip(ids, parts):
        body += [f'<h2 id="{i}">{html.escape(heading)}</h2>', content]
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}"
            f"</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    atomic_text(page, path)
    return path
