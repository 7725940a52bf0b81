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



def _headings(page: str) -> list[str]:
    import re

    return re.findall(r"<h2[^>]*>([^<]+)</h2>", page)


def _text(page: str) -> str:
    """The page without its embedded pictures."""
    import re

    return re.sub(r'src="data:[^"]+"', "", page)


def test_a_deploy_report_answers_first_and_keeps_engineering_notes_collapsed(tmp_path, browser):
    """Issue 31: the report opens with a plain summary (what was decided, how many slides need
    a look, with the exact review command), a table of contents links every section, the
    technical notes are collapsed (and in run.log), the Undecided gallery gives the best guess
    and no NaN shows."""
    from thumbclf.core import table as T
    from thumbclf.outputs.evaluate import ReportSpec, decisions_report

    p = np.array([[0.95, 0.03, 0.02], [0.1, 0.85, 0.05], [0.4, 0.35, 0.25], [0.9, 0.05, 0.05]])
    df = pd.DataFrame({T.PATH: [str(tmp_path / f"s{i}.png") for i in range(4)]})
    for j, c in enumerate(CLASSES):
        df[c] = p[:, j]
    df[T.DECISION] = decide(p, CLASSES, 0.8)
    df[T.REASON] = ["", "", "low confidence", ""]
    df[T.ERROR] = ["", "", "", ""]
    df.loc[3, T.ERROR], df.loc[3, T.DECISION] = "not a slide", ""
    folder = tmp_path / "archive"
    (folder / "plots").mkdir(parents=True)
    decisions_report(folder, df, ReportSpec(
        title="thumbclf — archive", params={"threshold": float("nan")}, thumbs=lambda path: None,
        notes=["Inference: PyTorch fp32 (bf16 failed its verification)."],
        sorted_into=folder / "sorted", advice=["This deploy looks <unlike> the training slides."]),
        classes=CLASSES, failures=1)
    page = _text((folder / "report.html").read_text())
    assert _headings(page)[:2] == ["Summary", "Data"]
    assert _headings(page)[-2:] == ["Technical notes", "Settings"]
    first = page.split('<h2 id="summary">', 1)[1].split("<h2", 1)[0]
    assert "<b>4</b> slides: <b>2</b> decided (Fat 1, IHC 1)" in first
    assert f"thumbclf review {folder}" in first and "<b>1</b> Undecided" in first
    assert "<b>1</b> could not be read" in first and "sorted/&lt;class&gt;/" in first
    assert "This deploy looks &lt;unlike&gt; the training slides." in first  # advice: answered first
    assert "NaN" not in page and ">nan<" not in page
    for heading in _headings(page):
        assert f">{heading}</a>" in page.split("</nav>", 1)[0], heading

    browser.get((folder / "report.html").as_uri())
    from selenium.webdriver.common.by import By

    assert browser.find_element(By.TAG_NAME, "h2").text == "Summary"
    note = browser.find_element(By.XPATH, "//li[contains(., 'bf16 failed')]")
    assert not note.is_displayed()  # collapsed: one click away
    browser.find_element(By.XPATH, "//a[text()='Undecided']").click()
    assert browser.execute_script("return location.hash") == "#undecided"


def test_an_evaluation_report_says_how_good_the_model_is_first(tmp_path):
    """Issue 31: the summary of a labelled evaluation gives the accuracy among decided, the
    share decided and the review command of the table's folder; terms have glosses."""
    predictions(tmp_path, np.random.default_rng(3))
    assert main([str(tmp_path / "predictions.csv"), "--bootstrap", "0"]) == 0
    page = _text((tmp_path / "evaluation" / "report.html").read_text())
    assert _headings(page)[0] == "Summary"
    first = page.split('<h2 id="summary">', 1)[1].split("<h2", 1)[0]
    assert "On the 60 labelled slides" in first and "of the decided ones are right" in first
    assert f"thumbclf review {tmp_path}" in first
    for term in ("ovo / ovr", "ECE", "AURC"):
        assert f"<b>{term}</b>:" in page, term
    assert "NaN" not in page


def _table(tmp_path, text, name="predictions.csv"):
    folder = tmp_path / name.split(".")[0]
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def test_evaluate_refuses_tables_it_cannot_honestly_evaluate(tmp_path, capsys):
    """Issue 24, hostile inputs."""
    from thumbclf.cli import evaluate_main

    head = "PATH,CLASSIFICATION,A,B,model_prediction,unfamiliarity\n"
    empty = _table(tmp_path, head)
    assert evaluate_main([str(empty), "--bootstrap", "0"]) == 2
    assert "no rows to evaluate (only a header" in capsys.readouterr().err
    twice = _table(tmp_path, "PATH,CLASSIFICATION,A,A,B,model_prediction\nx.png,A,0.5,0.2,0.3,A\n",
                   "twice.csv")
    assert evaluate_main([str(twice), "--bootstrap", "0"]) == 2
    assert "the columns A appear twice" in capsys.readouterr().err
    nan = _table(tmp_path, head + "x.png,A,0.9,0.1,A,nan\ny.png,B,0.2,0.8,B,0.5\n", "nan.csv")
    assert evaluate_main([str(nan), "--bootstrap", "0"]) == 2
    assert "column unfamiliarity: 1 values are not numbers of 0 or more (row 2)" in capsys.readouterr().err
    good = _table(tmp_path, head + "x.png,A,0.9,0.1,A,0.2\ny.png,B,0.2,0.8,B,\n", "good.csv")
    assert evaluate_main([str(good), "--bootstrap", "0"]) == 0
    capsys.readouterr()
    assert evaluate_main([str(good), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert "holds an earlier evaluation" in err and "--resume" not in err
