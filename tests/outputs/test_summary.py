"""outputs/summary.py: the report's first lines, in words: what was decided, what needs a look."""

from pathlib import Path

import pandas as pd

from thumbclf.core import table
from thumbclf.core.decide import NO_TISSUE, UNDECIDED
from thumbclf.outputs.summary import decisions_lines, glossary, review_command, section


def test_the_first_lines_count_decided_undecided_and_unreadable_slides():
    df = pd.DataFrame({table.DECISION: ["IHC", "IHC", "TMA", UNDECIDED, ""],
                       table.REASON: ["", "", "", NO_TISSUE, ""],
                       table.ERROR: ["", "", "", "", "x.png: file not found"]})
    lines = decisions_lines(df, review=Path("run"), failures=2)
    assert lines[0] == "<b>7</b> slides: <b>3</b> decided (IHC 2, TMA 1)."
    assert lines[1].startswith("<b>1</b> Undecided: they need a look; work through them with")
    assert "thumbclf review run" in lines[1]
    assert "<b>1</b> show no tissue" in " ".join(lines)
    assert lines[-1].startswith("<b>3</b> could not be read")


def test_no_undecided_slide_is_said_so():
    df = pd.DataFrame({table.DECISION: ["<A>"]})
    lines = decisions_lines(df, review=None)
    assert lines == ["<b>1</b> slides: <b>1</b> decided (&lt;A&gt; 1).", "No slide is Undecided."]


def test_the_section_escapes_caveats_and_terms_are_explained():
    assert review_command(Path("my run")) == "<code>thumbclf review &#x27;my run&#x27;</code>"
    assert "0 is perfect" in glossary("ECE")
    html = section(["one"], ["a <caveat>"])
    assert html.startswith("<ul class=summary><li>one</li></ul>") and "a &lt;caveat&gt;" in html
