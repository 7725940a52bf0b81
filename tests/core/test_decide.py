"""Decisions and reasons (core/decide.py): the source rule.

Issue 28: a slide that looks familiar is not trusted when most slides of its source are not.
"""

import numpy as np

from thumbclf.core.decide import (LOW_CONFIDENCE, MIN_SOURCE_SLIDES, NO_TISSUE, POOLED, UNDECIDED,
                                  UNFAMILIAR, UNFAMILIAR_SOURCE, decide_with_reasons,
                                  LookShift, look_shift, unfamiliar_sources)


def _rows(n_familiar: int, n_unfamiliar: int):
    decisions = ["A"] * n_familiar + [UNDECIDED] * n_unfamiliar
    reasons = [""] * n_familiar + [UNFAMILIAR] * n_unfamiliar
    u = np.array([0.4] * n_familiar + [3.0] * n_unfamiliar)
    return decisions, reasons, u


def test_a_deploy_mostly_unfamiliar_leaves_nothing_decided():
    decisions, reasons, u = _rows(8, 22)
    out, why, verdicts = unfamiliar_sources(decisions, reasons, u, None, 0.5)
    assert out == [UNDECIDED] * 30
    assert why[:8] == [UNFAMILIAR_SOURCE] * 8 and why[8:] == [UNFAMILIAR] * 22
    assert [(v.name, v.judged) for v in verdicts] == [("", 30)]
    assert verdicts[0].unfamiliar == 22 / 30


def test_a_few_unfamiliar_slides_or_the_rule_off_change_nothing():
    decisions, reasons, u = _rows(25, 5)
    assert unfamiliar_sources(decisions, reasons, u, None, 0.5)[:2] == (decisions, reasons)
    decisions, reasons, u = _rows(8, 22)
    assert unfamiliar_sources(decisions, reasons, u, None, 1.0)[:2] == (decisions, reasons)
    assert unfamiliar_sources(decisions, reasons, None, None, 0.5)[:2] == (decisions, reasons)


def test_a_few_slides_are_judged_on_strong_evidence_only():
    """A deploy of 10 slides, 7 of them unfamiliar, kept its 3 familiar-looking ones decided
    (a source had to have 20 slides); 3 of 5 is still not evidence enough."""
    decisions, reasons, u = _rows(3, 7)
    out, why, verdicts = unfamiliar_sources(decisions, reasons, u, None, 0.5)
    assert out == [UNDECIDED] * 10 and why[:3] == [UNFAMILIAR_SOURCE] * 3
    assert [(v.name, v.judged) for v in verdicts] == [("", 10)]
    for familiar, unfamiliar in ((2, 3), (1, 2), (0, 1)):
        decisions, reasons, u = _rows(familiar, unfamiliar)
        assert unfamiliar_sources(decisions, reasons, u, None, 0.5)[2] == []
    decisions, reasons, u = _rows(1, 4)  # 4 of 5
    assert unfamiliar_sources(decisions, reasons, u, None, 0.5)[0] == [UNDECIDED] * 5


def test_each_source_is_judged_on_its_own_and_small_ones_together():
    da, ra, ua = _rows(5, 20)  # lab A: mostly unfamiliar
    db, rb, ub = _rows(24, 1)  # lab B: like the training slides
    dc, rc, uc = _rows(3, 17)  # four small collections of 5: pooled, mostly unfamiliar
    sources = ["A"] * 25 + ["B"] * 25 + ["c1", "c2", "c3", "c4"] * 5
    out, why, verdicts = unfamiliar_sources(da + db + dc, ra + rb + rc,
                                            np.concatenate([ua, ub, uc]), sources, 0.5)
    assert {v.name for v in verdicts} == {"A", POOLED}
    assert out[25:50] == db  # lab B keeps its decisions
    assert set(out[:25]) == {UNDECIDED} and set(out[50:]) == {UNDECIDED}


def test_unreadable_and_blank_slides_are_neither_judged_nor_changed():
    decisions, reasons, u = _rows(8, 22)
    decisions += [""] * 5 + [UNDECIDED] * 5  # unreadable rows, then slides without tissue
    reasons += [""] * 5 + [NO_TISSUE] * 5
    u = np.concatenate([u, [np.nan] * 5, [0.3] * 5])
    out, why, verdicts = unfamiliar_sources(decisions, reasons, u, None, 0.5)
    assert out[30:35] == [""] * 5 and why[35:] == [NO_TISSUE] * 5
    assert verdicts[0].judged == 30


# target_error (issue 28, item 4) ------------------------------------------------------------

def test_target_error_picks_the_lowest_threshold_its_bound_allows():
    from thumbclf.core.decide import threshold_for_error, upper_bound

    conf = np.linspace(0.999, 0.5, 400)  # wrong: the 151st case, and every 3rd below 0.8
    wrong = np.array([i == 150 or (c < 0.8 and i % 3 == 0) for i, c in enumerate(conf)])
    y = np.where(wrong, 1, 0)
    probs = np.stack([conf, 1 - conf], axis=1)
    t = threshold_for_error(probs, y, 0.05)
    decided = conf >= t
    assert upper_bound(int(wrong[decided].sum()), int(decided.sum()), 0.95) <= 0.05
    k = int(decided.sum())  # one more case decided breaks the promise
    assert upper_bound(int(wrong[:k + 1].sum()), k + 1, 0.95) > 0.05
    assert 0.75 < t < 0.8  # past the one error, a little into the error-prone tail
    assert threshold_for_error(probs[:50], y[:50], 0.05) is None  # 50 slides cannot show 5%


def test_target_error_sets_the_threshold_and_the_report_says_what_was_supported():
    import pandas as pd

    from thumbclf.core.decide import threshold_in_force
    from thumbclf.outputs.evaluate import threshold_notes

    probs = np.array([[0.99, 0.01]] * 30 + [[0.6, 0.4]] * 10)
    y = np.array([0] * 30 + [1] * 10)
    chosen = threshold_in_force(given=0.5, target_error=0.1, val_probs=probs, val_y=y)
    assert chosen.value == 0.99 and "target_error" in chosen.reason
    none = threshold_in_force(target_error=0.01, val_probs=probs, val_y=y)
    assert none.value == 1.0 and none.reason.startswith("no threshold")
    table = pd.DataFrame({"CLASSIFICATION": ["a"] * 30 + ["b"] * 10, "threshold": 0.99,
                          "model_prediction": ["a"] * 29 + ["b"] + ["Undecided"] * 10})
    note, = threshold_notes(table, None, 0.1)
    assert "at most 10.0% of decided validation slides are wrong" in note
    assert "1 wrong of 30 decided; at most 14.9% with 95% confidence" in note
    assert threshold_notes(table, None, None) == []


def test_reasons_unfamiliar_wins_over_confidence():
    """Issue 15, trustworthy Undecided."""
    probs = np.array([[0.99, 0.01], [0.6, 0.4], [0.97, 0.03], [0.5, 0.5]])
    decisions, reasons = decide_with_reasons(probs, ["A", "B"], 0.9,
                                             np.array([0.3, 0.5, 1.7, np.nan]))
    assert decisions == ["A", UNDECIDED, UNDECIDED, UNDECIDED]
    assert reasons == ["", LOW_CONFIDENCE, UNFAMILIAR, LOW_CONFIDENCE]


def test_a_deploy_that_looks_unlike_the_validation_slides_is_named_and_an_ordinary_one_not():
    """Issue 28: the look part says whether a whole deploy was stained, scanned or rendered
    otherwise (the advice to adapt rests on it). 1.5 stands for the look part's margin: a slide
    lies beyond the look percentile where its look part times the margin is above 1."""
    reasons = [""] * 200
    ordinary = np.array([0.3] * 198 + [0.8] * 2)  # 1% beyond, as the validation slides
    assert look_shift(ordinary, reasons, 1.5) is None
    noisy = np.array([0.3] * 188 + [0.8] * 12)  # 6%: a threshold from few validation images
    assert look_shift(noisy, reasons, 1.5) is None
    shifted = np.array([0.3] * 140 + [0.8] * 60)  # 30% beyond
    assert look_shift(shifted, reasons, 1.5) == LookShift(beyond=60, judged=200)
    assert look_shift(shifted, reasons, 1.0) is None  # 0.8 x 1.0: not beyond
    assert look_shift(None, reasons, 1.5) is None  # a model file without the look part
    blank = [NO_TISSUE] * 60 + [""] * 140  # slides without tissue are not judged
    assert look_shift(np.array([0.8] * 60 + [0.3] * 140), blank, 1.5) is None
    few = np.array([0.3] * 17 + [0.8] * 3)  # 3 of 20: too little evidence
    assert look_shift(few, [""] * 20, 1.5) is None
    with_nan = np.array([np.nan] * 100 + [0.8] * 10)  # unreadable rows are not judged
    assert look_shift(with_nan, [""] * 110, 1.5) == LookShift(beyond=10, judged=10)
