import json

import numpy as np
import pandas as pd

from thumbclf.core.decide import decide
from thumbclf.evaluate import main

CLASSES = ["Fat", "IHC", "TMA"]


def predictions(tmp_path, rng):
    y = np.array(CLASSES)[rng.integers(0, 3, 60)]
    p = rng.dirichlet([1, 1, 1], 60)
    p[np.arange(60), [CLASSES.index(v) for v in y]] += 1.5
    p /= p.sum(1, keepdims=True)
    df = pd.DataFrame({"PATH": [str(tmp_path / f"{i}.png") for i in range(60)],
                       "CLASSIFICATION": y, "PATIENT": [f"p{i // 2}" for i in range(60)]})
    for j, c in enumerate(CLASSES):
        df[c] = p[:, j]
    df["model_prediction"] = decide(p, CLASSES, 0.9)
    df["error"] = ""
    df.to_csv(tmp_path / "predictions.csv", index=False)
    return df


def test_evaluate_recomputes_everything_from_a_table_with_another_threshold(tmp_path):
    df = predictions(tmp_path, np.random.default_rng(0))
    assert main([str(tmp_path / "predictions.csv"), "--threshold", "0.5", "--bootstrap", "100"]) == 0
    out = tmp_path / "evaluation-0.5"
    m = json.loads((out / "metrics.json").read_text())["all"]
    assert m["threshold"] == 0.5
    probs = df[CLASSES].to_numpy()
    assert m["coverage"] == (probs.max(1) >= 0.5).mean()
    for name in ("metrics.csv", "confusion_matrix.csv", "report.html", "plots/roc_curves.png",
                 "plots/reliability.png", "plots/accuracy_vs_threshold.png",
                 "plots/confusion_matrix.png"):
        assert (out / name).is_file(), name
    cm = pd.read_csv(out / "confusion_matrix.csv", index_col=0)
    assert cm.to_numpy().sum() == 60 and list(cm.columns) == CLASSES + ["Undecided"]
    assert main([str(tmp_path / "predictions.csv"), "--threshold", "0.5"]) == 2  # never overwrite


def test_evaluate_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "none.csv")]) == 2
    assert "none.csv: not found" in capsys.readouterr().err
    pd.DataFrame({"PATH": ["a"], "x": [1]}).to_csv(tmp_path / "p.csv", index=False)
    assert main([str(tmp_path / "p.csv")]) == 2
    assert "no model_prediction column" in capsys.readouterr().err


def test_the_report_states_each_suggested_thresholds_coverage_or_why_there_is_none():
    """Issue 31: every suggested threshold says how many slides it decides; none is suggested
    from fewer than MIN_DECIDED_FOR_SUGGESTION decided slides."""
    from thumbclf.outputs import metrics as M
    from thumbclf.outputs.evaluate import threshold_text

    rng = np.random.default_rng(1)
    y = np.array(CLASSES)[rng.integers(0, 3, 60)]
    p = np.full((60, 3), 0.05)
    p[np.arange(60), [CLASSES.index(v) for v in y]] = 0.9
    p[45:] = [0.4, 0.35, 0.25]  # 15 unsure, mostly wrong
    df = pd.DataFrame({"PATH": [f"{i}.png" for i in range(60)], "CLASSIFICATION": y})
    for j, c in enumerate(CLASSES):
        df[c] = p[:, j]
    df["model_prediction"] = decide(p, CLASSES, 0.9)
    text = threshold_text(M.compute(df, CLASSES, resamples=0), 0.9)
    assert "0.900 would reach 95% accuracy among decided slides, deciding 45 of 60 (75%)" in text
    small = threshold_text(M.compute(df.iloc[:12], CLASSES, resamples=0), 0.9)
    assert "would reach" not in small and "12 labelled slides are too few" in small

