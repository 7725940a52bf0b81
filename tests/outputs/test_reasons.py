"""Why slides are Undecided, which part of the rule fired, and figures per source
(outputs/reasons.py; the SOURCE column of inputs/samples.py).

Issue 28: Undecided that holds on real slides (items 1-3).
"""

from pathlib import Path

import numpy as np
import pandas as pd

from thumbclf.core import table
from thumbclf.core.decide import LOW_CONFIDENCE, NO_TISSUE, UNDECIDED, UNFAMILIAR
from thumbclf.inputs.samples import discover
from thumbclf.outputs import reasons
from thumbclf.outputs.evaluate import ReportSpec, evaluate_table


def _table() -> pd.DataFrame:
    return pd.DataFrame({
        table.PATH: [f"s{i}.png" for i in range(6)],
        table.LABEL: ["A", "A", "B", "B", "A", "B"],
        table.SOURCE: ["lab 1", "lab 1", "lab 1", "lab 2", "lab 2", "lab 2"],
        "A": [0.95, 0.9, 0.2, 0.99, 0.6, 0.5], "B": [0.05, 0.1, 0.8, 0.01, 0.4, 0.5],
        table.DECISION: ["A", "A", "B", UNDECIDED, UNDECIDED, UNDECIDED],
        table.REASON: ["", "", "", NO_TISSUE, UNFAMILIAR, LOW_CONFIDENCE],
        table.UNFAMILIARITY: [0.2, 0.3, 0.4, 0.5, 2.0, 0.6],
        table.UNFAMILIAR_CONTENT: [0.2, 0.3, 0.4, 0.5, 0.7, 0.6],
        table.UNFAMILIAR_LOOK: [0.1, 0.1, 0.1, 0.2, 2.0, 0.1],
        table.TISSUE: [0.3, 0.3, 0.3, 0.0, 0.2, 0.3],
        table.THRESHOLD: 0.8,
    })


def test_reasons_are_counted_by_code_and_part():
    counts = reasons.reason_counts(_table())
    assert counts == {NO_TISSUE: 1, f"{UNFAMILIAR} (content)": 0, f"{UNFAMILIAR} (look)": 1,
                      f"{UNFAMILIAR} (content and look)": 0, UNFAMILIAR: 0, "unfamiliar source": 0,
                      LOW_CONFIDENCE: 1}
    assert reasons.fired(_table()) == ["", "", "", "", "look", ""]


def test_figures_per_source():
    sources = reasons.by_source(_table())
    assert list(sources.index) == ["lab 1", "lab 2"]
    assert sources.loc["lab 1", "coverage"] == 1.0 and sources.loc["lab 2", "coverage"] == 0.0
    assert sources.loc["lab 1", "accuracy (decided)"] == 1.0
    assert sources.loc["lab 2", f"Undecided: {NO_TISSUE}"] == 1
    assert reasons.by_source(_table().drop(columns=[table.SOURCE])) is None


SPEC = ReportSpec(order=["A", "B"], xt=["A", "B"], yt=["A", "B"], resamples=0, seed=1,
                  thumbs=lambda path: None)


def test_the_report_and_metrics_give_each_source(tmp_path):
    df = _table()
    evaluate_table(df, ["A", "B"], tmp_path, SPEC, threshold=None)
    scopes = set(pd.read_csv(tmp_path / "metrics.csv")["scope"])
    assert {"all", "source lab 1", "source lab 2"} <= scopes
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Undecided: why" in page and "lab 2" in page and "unfamiliar (look)" in page


def test_re_evaluating_at_another_threshold_keeps_no_tissue(tmp_path):
    """A blank slide stays Undecided at any threshold (the tissue_fraction column)."""
    df = _table()
    df.loc[3, table.REASON], df.loc[3, table.DECISION] = NO_TISSUE, UNDECIDED
    evaluate_table(df, ["A", "B"], tmp_path, SPEC, threshold=0.5)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert f"{NO_TISSUE}: <b>1</b>" in page


def test_a_source_column_is_read_and_written_back(tmp_path, tiny_model):
    from PIL import Image

    from thumbclf import load_model

    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((64, 64, 3), 200 + i, dtype=np.uint8)).save(p)
        paths.append(p)
    pd.DataFrame({"PATH": [p.name for p in paths], "SOURCE": [" site A", "site B", ""]}).to_csv(
        tmp_path / "in.csv", index=False)
    found = discover(tmp_path / "in.csv", need_labels=False)
    assert [s.source for s in found.samples] == ["site A", "site B", None]
    out = load_model(tiny_model).predict(tmp_path / "in.csv")
    assert list(out[table.SOURCE]) == ["site A", "site B", ""]
    assert Path(out[table.PATH].iloc[0]).name == "img0.png"


def test_the_summary_says_first_when_the_model_does_not_fit_the_slides():
    """Issue 28: a deploy the source rule stopped opens with why, not only with counts."""
    from thumbclf.outputs.summary import decisions_lines

    df = _table()
    df.loc[0:2, table.DECISION], df.loc[0:2, table.REASON] = UNDECIDED, "unfamiliar source"
    text = " ".join(decisions_lines(df, review=None))
    assert "does not fit these slides" in text and "3 more of the same source" in text
    assert "<b>1</b> show no tissue" in text
    assert "does not fit" not in " ".join(decisions_lines(_table(), review=None))
