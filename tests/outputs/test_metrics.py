import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from thumbclf.outputs import metrics as M

CLASSES = ["A", "B", "C"]


def table(labels, probs, threshold=0.5, patients=None):
    probs = np.asarray(probs, dtype=float)
    df = pd.DataFrame({"PATH": [f"{i}.png" for i in range(len(labels))], "CLASSIFICATION": labels})
    if patients is not None:
        df["PATIENT"] = patients
    for j, c in enumerate(CLASSES):
        df[c] = probs[:, j]
    from thumbclf.core.decide import decide
    df["model_prediction"] = decide(probs, CLASSES, threshold)
    return df


def onehot(y, hi=0.9):
    p = np.full((len(y), 3), (1 - hi) / 2)
    p[np.arange(len(y)), [CLASSES.index(v) for v in y]] = hi
    return p


Y = ["A"] * 4 + ["B"] * 4 + ["C"] * 4


def test_perfect_classifier():
    m = M.compute(table(Y, onehot(Y)), CLASSES, resamples=200)
    assert m.macro_auroc_ovr == 1 and m.macro_auroc_ovo == 1
    assert all(r["auroc"] == 1 and r["average_precision"] == 1 for r in m.per_class)
    assert m.coverage == 1 and m.accuracy_decided == 1 and m.accuracy_all == 1
    assert m.macro_f1 == 1 and m.per_class[0]["sensitivity"] == 1
    assert m.macro_auroc_ovr_ci == [1.0, 1.0]
    assert m.ece == pytest.approx(0.1)  # always 90% sure, always right


def test_reversed_classifier_has_auroc_zero():
    m = M.compute(table(Y, (1 - onehot(Y)) / 2, threshold=0.4), CLASSES, resamples=0)
    assert all(r["auroc"] == 0 for r in m.per_class)
    assert m.macro_auroc_ovr == 0 and m.macro_auroc_ovo == 0
    assert m.accuracy_all == 0 and m.per_class[0]["sensitivity"] == 0


def test_constant_classifier_is_chance_and_all_undecided():
    m = M.compute(table(Y, np.full((12, 3), 1 / 3)), CLASSES, resamples=100)
    assert m.macro_auroc_ovr == 0.5 and m.macro_auroc_ovo == 0.5
    assert m.coverage == 0 and m.accuracy_decided is None and m.accuracy_all == 0


def test_a_missing_class_is_reported_not_fatal():
    y = ["A"] * 4 + ["B"] * 4
    m = M.compute(table(y, onehot(y)), CLASSES, resamples=50)
    c = m.per_class[2]
    assert c["n"] == 0 and c["auroc"] is None and c["sensitivity"] is None
    assert m.macro_auroc_ovr == 1
    assert any("class C is absent" in n for n in m.notes)
    one = M.compute(table(["A", "B", "C", "A"], onehot(["A", "B", "C", "A"])), CLASSES, resamples=50)
    assert any("single image" in n for n in one.notes)


def test_weighted_bootstrap_metrics_equal_scikit_learn():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(60), 1)  # with ties
    pos = rng.random(60) < 0.4
    w = rng.multinomial(60, np.full(60, 1 / 60), size=5).astype(float)
    auc = M.weighted_auroc(scores, pos, w)
    ap = M.weighted_ap(scores, pos, w)
    for k in range(5):
        idx = np.repeat(np.arange(60), w[k].astype(int))
        assert auc[k] == pytest.approx(roc_auc_score(pos[idx], scores[idx]))
        assert ap[k] == pytest.approx(average_precision_score(pos[idx], scores[idx]))


def test_bootstrap_is_seeded_and_resamples_patients():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet([1, 1, 1], 12)
    a = M.compute(table(Y, probs), CLASSES, resamples=300, seed=5)
    b = M.compute(table(Y, probs), CLASSES, resamples=300, seed=5)
    assert a.macro_auroc_ovr_ci == b.macro_auroc_ovr_ci
    lo, hi = a.macro_auroc_ovr_ci
    assert lo < a.macro_auroc_ovr < hi
    w = M.bootstrap_weights(6, np.array(["p1", "p1", "p2", "p2", "p3", "p3"]), 50, 0)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 2] == w[:, 3]).all()


def test_ovo_bootstrap_point_matches_scikit_learn_ovo():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet([1, 1, 1], 30)
    y = np.array(CLASSES)[rng.integers(0, 3, 30)]
    ref = roc_auc_score([CLASSES.index(v) for v in y], probs, multi_class="ovo")
    ones = np.ones((1, 30))
    yy = np.array([CLASSES.index(v) for v in y])
    assert M._macro_ovo_weighted(yy, probs, [0, 1, 2], ones)[0] == pytest.approx(ref)
    assert M.compute(table(list(y), probs), CLASSES, resamples=0).macro_auroc_ovo == pytest.approx(ref)


def test_selective_prediction_and_thresholds():
    probs = onehot(Y, hi=0.9)
    probs[0] = [0.1, 0.6, 0.3]  # one confident-ish error
    m = M.compute(table(Y, probs, threshold=0.7), CLASSES, resamples=0)
    assert m.coverage == pytest.approx(11 / 12) and m.accuracy_decided == 1
    assert m.threshold_for_99 is None  # 12 slides: too few to suggest a threshold (issue 31)
    curve = {r["threshold"]: r for r in m.selective}
    assert curve[0.0]["coverage"] == 1 and curve[0.0]["accuracy"] == pytest.approx(11 / 12)
    assert m.aurc == pytest.approx(np.mean([0] * 11 + [1 / 12]))


def test_a_suggested_threshold_decides_enough_slides_and_states_its_coverage():
    """Issue 31: a threshold that decides 1 of 97 slides is no suggestion; one that decides
    enough comes with the slides it decides."""
    from thumbclf.core.decide import MIN_DECIDED_FOR_SUGGESTION

    rng = np.random.default_rng(4)
    y = list(np.array(CLASSES)[rng.integers(0, 3, 97)])
    probs = np.full((97, 3), 0.2)  # one slide at 0.736, right; the rest below it, often wrong
    for i, label in enumerate(y):
        j = CLASSES.index(label) if i == 0 or i % 2 else (CLASSES.index(label) + 1) % 3
        probs[i, j] = 0.736 if i == 0 else 0.5 + 0.2 * rng.random()
    m = M.compute(table(y, probs, threshold=0.9), CLASSES, resamples=0)
    assert m.threshold_for_95 is None and m.threshold_for_99 is None
    assert [s["threshold"] for s in m.suggestions] == [None, None]

    y = ["A"] * 20 + ["B"] * 10 + ["C"] * 10  # 30 confident and right, 10 unsure, half wrong
    probs = onehot(y, hi=0.95)
    probs[30:] = [[0.5, 0.3, 0.2], [0.3, 0.5, 0.2]] * 5
    m = M.compute(table(y, probs), CLASSES, resamples=0)
    s95 = m.suggestions[0]
    assert s95["threshold"] == pytest.approx(0.95) and m.threshold_for_95 == pytest.approx(0.95)
    assert (s95["decided"], s95["total"], s95["coverage"]) == (30, 40, 0.75)
    assert MIN_DECIDED_FOR_SUGGESTION <= 30
    rows = {r["metric"]: r["value"] for r in M.summary_rows(m, "all")}
    assert rows["coverage_at_threshold_for_95"] == 0.75


def test_confusion_matrix_rows_true_columns_decisions_with_undecided():
    df = table(["A", "A", "B", "C"], [[0.9, 0.05, 0.05], [0.4, 0.3, 0.3], [0.9, 0.05, 0.05],
                                      [0.05, 0.05, 0.9]])
    cm = M.confusion(df, ["C", "B", "A"])
    assert list(cm.index) == ["C", "B", "A"] and list(cm.columns) == ["C", "B", "A", "Undecided"]
    assert cm.loc["A", "A"] == 1 and cm.loc["A", "Undecided"] == 1 and cm.loc["B", "A"] == 1
    assert M.row_normalised(cm).loc["A"].sum() == pytest.approx(1)
