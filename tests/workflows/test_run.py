"""workflows/run.py: the run's folders are checked before anything is written."""

from __future__ import annotations

import pytest

from thumbclf.config import TRAIN
from thumbclf.config.files import load_experiment
from thumbclf.core.errors import ConfigError
from thumbclf.inputs import synth
from thumbclf.workflows.run import check_cache_apart


def test_a_cache_folder_among_a_tables_images_is_refused(tmp_path):
    """Issue 33, item 11: a cache folder inside the folders a table's images live in was
    accepted, and matplotlib's cache was written there. Item 20: a results folder inside the
    input folder was refused with a message about cache_dir, which the user never set."""
    table = synth.generate(tmp_path / "data", per_class=2, seed=1, sides=(40, 60),
                           classes=("IHC", "TMA"))
    images = tmp_path / "data" / "IHC"
    params, _ = load_experiment({"thumbData": str(table), "cache_dir": str(images / "cache")},
                                workflow=TRAIN, output=tmp_path / "out")
    with pytest.raises(ConfigError, match=r"cache_dir .*IHC.cache is in .*IHC, a folder of the "
                                          r"table's images .*choose a cache_dir outside it"):
        check_cache_apart(params)
    params, _ = load_experiment({"thumbData": str(tmp_path / "data")}, workflow=TRAIN,
                                output=tmp_path / "data" / "results")
    with pytest.raises(ConfigError, match=r"the results folder is inside the input folder .*"
                                          r"choose an --output outside it") as caught:
        check_cache_apart(params)
    assert "cache_dir" not in str(caught.value)
    fine, _ = load_experiment({"thumbData": str(table)}, workflow=TRAIN, output=tmp_path / "out")
    check_cache_apart(fine)  # beside the data, not inside an image folder: accepted
