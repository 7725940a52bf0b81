"""core/table.py: the predictions table's own rules (issue 32: the reserved-column rule lives
here, beside the columns it protects)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import HOSTILE
from thumbclf.core import table
from thumbclf.core.errors import ReadFailure
from thumbclf.core.decide import UNDECIDED, decide
from thumbclf.core.errors import DataError
from thumbclf.evaluate import main as evaluate_main


def test_class_names_that_are_the_tables_own_columns_are_reserved():
    classes = ["IHC", table.DECISION, UNDECIDED, table.PATH, table.UNFAMILIARITY, "TMA"]
    assert table.reserved_names(classes) == sorted([table.DECISION, UNDECIDED, table.PATH,
                                                    table.UNFAMILIARITY])
    assert table.reserved_names(["IHC", "TMA"]) == []


def test_reading_inputs_refuses_a_reserved_class_name_naming_the_file():
    with pytest.raises(DataError) as err:
        table.check_class_names(("IHC", table.ERROR), Path("labels.csv"))
    assert str(err.value) == ("labels.csv: class names error are reserved column names of the "
                              "predictions table; rename those classes")
    table.check_class_names(("IHC", "TMA"), Path("labels.csv"))  # no clash: nothing to say


def test_build_takes_input_columns_and_writes_only_those_given():
    """Issue 32: build takes the inputs' columns (no samples): a column left None is not in
    the table; a given one is, in the documented order, its text as given."""
    inputs = table.InputColumns(paths=["a.png", "b\udcff.png"], labels=["A", "B"],
                                errors=["", ReadFailure("b: gone", "not found")])
    df = table.build(inputs, [[0.25, 0.75], [float("nan")] * 2], ["A", "B"], ["B", ""],
                     threshold=0.5, reasons=["", ""])
    assert list(df.columns) == [table.PATH, table.LABEL, "A", "B", table.DECISION, table.REASON,
                                table.ERROR, table.ERROR_KIND, table.THRESHOLD]
    assert df[table.ERROR_KIND].tolist() == ["", "not found"]  # issue 32: the error's kind
    assert df[table.PATH].tolist() == ["a.png", "b\udcff.png"]  # not UTF-8: kept as given
    rows = table.InputColumns(paths=["a.png"], rows=[2], patients=["p1"], sources=["s1"])
    df = table.build(rows, [[0.25, 0.75]], ["A", "B"], ["B"], threshold=0.5, fold=2)
    assert list(df.columns)[:6] == [table.PATH, table.ROW, table.PATIENT, table.SOURCE,
                                    table.FOLD, "A"]


def test_neutralised_cells_read_back_exactly(tmp_path):
    """Issue 24, item 5: no table runs formulas in a spreadsheet."""
    import pandas as pd

    from thumbclf.core import table
    from thumbclf.core.files import atomic_csv

    df = pd.DataFrame({"PATH": list(HOSTILE), HOSTILE[0]: [0.5] * len(HOSTILE),
                       "n": range(len(HOSTILE))})
    atomic_csv(df, tmp_path / "t.csv")
    text = (tmp_path / "t.csv").read_text()
    cells = [c for line in text.splitlines() for c in line.split(",")]
    assert not any(c.lstrip('"').startswith(("=", "+", "@", "-2")) for c in cells), text
    back = table.read_csv(tmp_path / "t.csv", numeric=["n", HOSTILE[0]])
    assert list(back.columns) == list(df.columns) and back["PATH"].tolist() == list(HOSTILE)
    assert back["n"].tolist() == list(range(len(HOSTILE)))


def test_tables_escape_names_that_are_not_utf8_reversibly(tmp_path):
    """Issue 33, item 16: a table held the raw bytes of such a name, so pandas' default
    reader failed on it; now each byte is \\xNN and read back exactly."""
    import random

    import pandas as pd

    from thumbclf.core import table
    from thumbclf.core.files import atomic_csv

    odd = b"caf\xe9 \xff.png".decode("utf-8", "surrogateescape")
    names = [odd, "C:\\slides\\a.svs", "\\x80 as text", "=cmd", "plain"]
    atomic_csv(pd.DataFrame({"PATH": table.text(names), "n": range(5)}), tmp_path / "t.csv")
    raw = (tmp_path / "t.csv").read_bytes().decode("utf-8")  # strict: valid UTF-8
    assert "caf\\xe9 \\xff.png" in raw and "C:\\slides\\a.svs" in raw  # Windows paths as they are
    assert table.read_csv(tmp_path / "t.csv")["PATH"].tolist() == names
    rng = random.Random(0)
    alphabet = ["\\", "x", "5", "c", "C", "8", "e", "f", "\udc80", "\udcff", "a"]
    for _ in range(2000):
        cell = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        assert table.unescape(table.escape(cell)) == cell
        table.escape(cell).encode("utf-8")


def test_na_and_null_labels_survive_every_reader(tmp_path):
    """Issue 24, item 9: one table reader: 'NA' and 'null' stay labels."""
    import pandas as pd

    from thumbclf.core import table
    from thumbclf.core.files import atomic_csv
    from thumbclf.inputs import splits

    fold = pd.DataFrame({"PATH": ["a.png", "b.png"], "CLASSIFICATION": ["NA", "null"],
                         "fold": [1, 1], "NA": [0.9, 0.2], "null": [0.1, 0.8],
                         "model_prediction": ["NA", "null"], "threshold": [0.5, 0.5]})
    atomic_csv(fold, tmp_path / "predictions.csv")
    back = table.read_fold(tmp_path / "predictions.csv")
    assert back["CLASSIFICATION"].tolist() == ["NA", "null"]
    assert back["model_prediction"].tolist() == ["NA", "null"] and back["NA"].tolist() == [0.9, 0.2]
    (tmp_path / "fold_1").mkdir()
    sp = pd.DataFrame({"position": [0, 1], "fold": [1, 1], "role": ["val", "val"]})
    splits.save(sp, ["a.png", "b.png"], ["NA", "null"], None, tmp_path / "splits.csv")
    got = splits.validation_of_model(tmp_path / "fold_1" / "model.pt")
    assert [label for _, label in got] == ["NA", "null"]


def test_every_table_is_read_by_the_one_reader():
    """Issue 24, item 9: one table reader: 'NA' and 'null' stay labels."""
    import re

    from conftest import ROOT

    readers = re.compile(r"\bpd\.read_(csv|excel|table)\(|\bcsv\.(DictReader|reader)\(")
    found = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "thumbclf").rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if readers.search(line) and p.name != "table.py" and "one reader" not in line]
    allowed = {"thumbclf/inputs/samples.py"}  # the spreadsheet reader (pd.read_excel), then as_written
    assert [f for f in found if f.split(":")[0] not in allowed] == []


def _table(tmp_path, change=None):
    rng = np.random.default_rng(0)
    classes = ["Fat", "IHC", "TMA"]
    p = rng.dirichlet([1, 1, 1], 40)
    df = pd.DataFrame({"PATH": [f"{i}.png" for i in range(40)],
                       "CLASSIFICATION": np.array(classes)[rng.integers(0, 3, 40)]})
    for j, c in enumerate(classes):
        df[c] = p[:, j]
    df["model_prediction"] = decide(p, classes, 0.5)
    df["error"] = ""
    if change:
        df = change(df)
    df.to_csv(tmp_path / "predictions.csv", index=False)
    return tmp_path / "predictions.csv"


@pytest.mark.parametrize("change,message", [
    (lambda d: d.assign(Fat=["x"] + [0.1] * 39), "column Fat: 1 values are not numbers (row 2)"),
    (lambda d: d.assign(IHC=[float("nan")] * 40), "column IHC: 40 values are not numbers"),
    (lambda d: d.assign(Fat=d["Fat"] * 3, IHC=d["IHC"] * 3, TMA=d["TMA"] * 3), "outside 0-1"),
    (lambda d: d.assign(Fat=d["Fat"] / 2, IHC=d["IHC"] / 2, TMA=d["TMA"] / 2), "do not sum to 1"),
    (lambda d: d.assign(Fat=-d["Fat"]), "values lie outside 0-1"),
    (lambda d: d.drop(columns=["TMA"]), "do not sum to 1"),
])
def test_evaluate_validates_its_table(tmp_path, capsys, change, message):
    """Issue 10, item 9: nothing lost."""
    table = _table(tmp_path, change)
    assert evaluate_main([str(table), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(table) in err and "Traceback" not in err
    assert not (tmp_path / "evaluation").exists()


def test_evaluate_refuses_an_empty_file(tmp_path, capsys):
    """Issue 10, item 9: nothing lost."""
    (tmp_path / "p.csv").write_bytes(b"")
    assert evaluate_main([str(tmp_path / "p.csv")]) == 2
    assert "the file is empty" in capsys.readouterr().err


def test_evaluate_accepts_a_valid_table(tmp_path):
    """Issue 10, item 9: nothing lost."""
    assert evaluate_main([str(_table(tmp_path)), "--bootstrap", "0"]) == 0
    m = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())["all"]
    assert m["n"] == 40
