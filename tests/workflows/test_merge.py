"""workflows/merge.py: the shards of a deploy put back into one table, in input order (issue 30)."""

import json

import pytest

from thumbclf.core import layout
from thumbclf.core.errors import DataError
from thumbclf.workflows.merge import check_shards, merged_table


def _shard(results, i, n, rows, positions, inputs=3, sha="x"):
    folder = layout.shard_folder(results, i, n)
    folder.mkdir(parents=True)
    (folder / layout.PREDICTIONS).write_text(rows)
    (folder / layout.CONFIG).write_text("batch_size: 8\n")
    (folder / layout.SHARD_RECORD).write_text(json.dumps(
        {"finished": True, "inputs_sha256": sha, "positions": positions, "inputs": inputs}))
    return folder


def test_shard_rows_go_back_into_input_order(tmp_path):
    results = tmp_path / "r"
    _shard(results, 1, 2, "PATH,A,B,model_prediction\nb.png,0.2,0.8,B\n", [1])
    _shard(results, 2, 2, "PATH,A,B,model_prediction\nc.png,0.6,0.4,A\na.png,0.9,0.1,A\n",
           [2, 0])
    found = check_shards(results)
    table = merged_table(found, ["A", "B"])
    assert table["PATH"].tolist() == ["a.png", "b.png", "c.png"]
    assert table["A"].tolist() == [0.9, 0.2, 0.6] and table["A"].dtype == float


def test_shares_that_do_not_cover_every_input_once_are_refused(tmp_path):
    results = tmp_path / "r"
    _shard(results, 1, 2, "PATH\na.png\n", [0])
    _shard(results, 2, 2, "PATH\na.png\n", [0])
    with pytest.raises(DataError, match="do not cover the 3 inputs once each"):
        check_shards(results)


def test_a_shard_of_other_inputs_is_named(tmp_path):
    results = tmp_path / "r"
    _shard(results, 1, 2, "PATH\na.png\n", [0], inputs=2)
    _shard(results, 2, 2, "PATH\nb.png\n", [1], inputs=2, sha="y")
    with pytest.raises(DataError, match="shard shards/2-of-2 ran with another input list"):
        check_shards(results)
