"""core/table.py: the predictions table's own rules (issue 32: the reserved-column rule lives
here, beside the columns it protects)."""

from pathlib import Path

import pytest

from thumbclf.core import table
from thumbclf.core.decide import UNDECIDED
from thumbclf.core.errors import DataError


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
                                errors=["", "unreadable"])
    df = table.build(inputs, [[0.25, 0.75], [float("nan")] * 2], ["A", "B"], ["B", ""],
                     threshold=0.5, reasons=["", ""])
    assert list(df.columns) == [table.PATH, table.LABEL, "A", "B", table.DECISION, table.REASON,
                                table.ERROR, table.THRESHOLD]
    assert df[table.PATH].tolist() == ["a.png", "b\udcff.png"]  # not UTF-8: kept as given
    rows = table.InputColumns(paths=["a.png"], rows=[2], patients=["p1"], sources=["s1"])
    df = table.build(rows, [[0.25, 0.75]], ["A", "B"], ["B"], threshold=0.5, fold=2)
    assert list(df.columns)[:6] == [table.PATH, table.ROW, table.PATIENT, table.SOURCE,
                                    table.FOLD, "A"]
