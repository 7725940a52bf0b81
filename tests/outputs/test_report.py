"""outputs/report.py: the report page, its headings, numbers and missing values."""

import math

import pandas as pd

from thumbclf.outputs import report


def test_numbers_and_missing_values_are_written_for_people():
    assert report.fmt(0.91234) == "0.912" and report.fmt(0.5, pct=True) == "50.0%"
    assert report.fmt(None) == report.fmt(math.nan) == "–"
    assert report.fmt("<b>") == "&lt;b&gt;"
    assert report.ci(0.8, [0.7, 0.9]).startswith("0.800 <span class=muted>[0.700–0.900]")
    assert report.ci(0.8, None) == "0.800" and report.ci(None, None) == "–"
    assert "NaN" not in report.table(pd.DataFrame({"x": [1.0, math.nan]}))


def test_headings_get_unique_ids():
    taken: set[str] = set()
    assert [report.slug(h, taken) for h in ("Results", "Results", "Ünïcode!", "")] == [
        "results", "results-2", "n-code", "section"]


def test_the_page_starts_with_the_summary_and_escapes_what_it_shows(tmp_path):
    path = report.write(tmp_path / "report.html", title="Run <1>", kind="deploy",
                        params={"lr": 0.1, "name": "<script>"}, data_summary="12 slides",
                        sections=[("Plots", "<p>plots</p>")], notes=["engine: torch"],
                        summary="<ul>first</ul>")
    page = path.read_text(encoding="utf-8")
    assert page.index('id="summary"') < page.index('id="data"') < page.index('id="plots"')
    assert "<h1>Run &lt;1&gt;</h1>" in page and "&lt;script&gt;" in page
    assert "1 note on how this run worked" in page
