"""core/table.py: the predictions table's own rules (issue 32: the reserved-column rule lives
here, beside the columns it protects)."""

from pathlib import Path

import pytest

from thumbclf.core import table
from thumbclf.core.decide import UNDECIDED
from thumbclf.core.errors import DataError
from thumbclf.inputs.samples import check_class_names


def test_class_names_that_are_the_tables_own_columns_are_reserved():
    classes = ["IHC", table.DECISION, UNDECIDED, table.PATH, table.UNFAMILIARITY, "TMA"]
    assert table.reserved_names(classes) == sorted([table.DECISION, UNDECIDED, table.PATH,
                                                    table.UNFAMILIARITY])
    assert table.reserved_names(["IHC", "TMA"]) == []


def test_reading_inputs_refuses_a_reserved_class_name_naming_the_file():
    with pytest.raises(DataError) as err:
        check_class_names(("IHC", table.ERROR), Path("labels.csv"))
    assert str(err.value) == ("labels.csv: class names error are reserved column names of the "
                              "predictions table; rename those classes")
    check_class_names(("IHC", "TMA"), Path("labels.csv"))  # no clash: nothing to say
