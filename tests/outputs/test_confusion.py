"""outputs/confusion.py: the confusion matrix's layout (order and labels of its rows and columns)."""

import pytest

from thumbclf.core.errors import ConfigError
from thumbclf.outputs.confusion import cm_layout

CLASSES = ["A", "B", "C"]


def test_confusion_matrix_label_options_are_validated():
    order, xt, yt = cm_layout(CLASSES, ["C", "A", "B"], ["c", "a", "b"], ["cc", "aa", "bb"])
    assert order == ["C", "A", "B"] and xt == ["c", "a", "b", "Undecided"] and yt == ["cc", "aa", "bb"]
    with pytest.raises(ConfigError, match="cm_sortlabels names D, which is no class"):
        cm_layout(CLASSES, ["A", "B", "D"], None, None)
    with pytest.raises(ConfigError, match="cm_sortlabels leaves out C"):
        cm_layout(CLASSES, ["A", "B"], None, None)
    with pytest.raises(ConfigError, match="cm_xlabels must have 3 labels"):
        cm_layout(CLASSES, None, ["a"], None)
    with pytest.raises(ConfigError, match="cm_ylabels must have 3 labels"):
        cm_layout(CLASSES, None, None, ["a", "b", "c", "d"])
