"""SLURM array shards of a deploy, and ``thumbclf merge``.

Issue 30: ``--shard I/N`` (or SLURM_ARRAY_TASK_ID/COUNT/MIN) deploys a stable, size-balanced
share into its own folder; finished shards are skipped on re-submission; ``merge`` checks every
shard finished alike and writes exactly the one-process table, evaluation and sorted folders.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, every_core, make_pyramid, run_cli, write_yaml
from thumbclf.core import layout
from thumbclf.core.errors import ConfigError
from thumbclf.workflows import shards


def merge_cli(results: Path) -> subprocess.CompletedProcess:
    from thumbclf import cli
    from thumbclf.core.logs import remove_handlers

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.command(["merge", str(results)])
    finally:
        remove_handlers()
    return subprocess.CompletedProcess(["merge"], code, out.getvalue(), err.getvalue())


def test_shares_are_stable_balanced_by_size_and_by_count_where_size_is_unknown():
    sizes = [100, 1, 1, 1, 50, 50, 2, 2]
    got = shards.shares(sizes, 2)
    assert got == shards.shares(list(sizes), 2)  # the same on every node
    assert sorted(p for s in got for p in s) == list(range(8))
    totals = [sum(sizes[k] for k in s) for s in got]
    assert max(totals) - min(totals) <= 3 and got[0] == [0, 1, 3, 6]
    unknown = shards.shares([None] * 9, 4)
    assert [len(s) for s in unknown] == [3, 2, 2, 2]


def test_the_share_comes_from_the_slurm_array_and_bad_ones_say_what_to_do():
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "4"}
    got = shards.resolve(None, env)
    assert (got.index, got.count) == (2, 3) and "SLURM_ARRAY_TASK_ID=5" in got.why
    assert shards.resolve("3/3", env) == shards.Shard(3, 3)  # --shard wins
    assert shards.resolve(None, {}) is None
    with pytest.raises(ConfigError, match="--shard must be I/N with 1 <= I <= N.*got '5/4'"):
        shards.parse("5/4")
    stepped = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_COUNT": "4",
               "SLURM_ARRAY_TASK_MIN": "0"}
    with pytest.raises(ConfigError, match="not one of the array's shares"):
        shards.resolve(None, stepped)


@pytest.fixture
def deploy_inputs(tiny_data, tmp_path):
    """The tiny labelled thumbnails plus one slide, as a table."""
    table = pd.read_csv(tiny_data)
    table["PATH"] = [str((tiny_data.parent / p).resolve()) for p in table["PATH"]]
    slide = make_pyramid(tmp_path / "slide.tiff")
    extra = pd.DataFrame({"PATH": [str(slide)], "CLASSIFICATION": ["TMA"],
                          "PATIENT": [table["PATIENT"].iloc[0]]})
    pd.concat([table, extra]).to_csv(tmp_path / "inputs.csv", index=False)
    return tmp_path / "inputs.csv"


@pytest.mark.slow
def test_four_shards_and_merge_give_the_one_process_results(deploy_inputs, tiny_model, tmp_path):
    exp = write_yaml(tmp_path / "d.yaml", f"thumbData: {deploy_inputs}\n"
                     f"modelAdr: {tiny_model / 'model.pt'}\nsortThumbs: true\nnum_workers: 0\n"
                     "gradcam: 0\nbootstrap: 0\nbatch_size: 1\n")
    # batch_size 1: each image's probabilities do not depend on which images share its batch
    # (CPU kernels may round the last bit differently for another batch; see docs/how-to/slurm)
    one, four = tmp_path / "one", tmp_path / "four"
    r = run_cli("deploy", [str(exp), "--output", str(one)])
    assert r.returncode == 0, r.stderr
    for i in (1, 2, 4):
        r = run_cli("deploy", [str(exp), "--output", str(four), "--shard", f"{i}/4"])
        assert r.returncode == 0, r.stderr
    r = merge_cli(four)
    assert r.returncode == 2 and "shard 3/4 never ran" in r.stderr
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"}
    r = run_cli("deploy", [str(exp), "--output", str(four)], env_extra=env)  # the array's task
    assert r.returncode == 0, r.stderr
    assert "SLURM_ARRAY_TASK_ID=2" in (four / "shards" / "3-of-4" / layout.RUN_LOG).read_text()
    r = run_cli("deploy", [str(exp), "--output", str(four), "--shard", "1/4"])  # re-submitted
    assert r.returncode == 0 and "finished already" in r.stderr
    assert not (four / layout.PREDICTIONS).exists()  # shards write no results of their own
    r = merge_cli(four)
    assert r.returncode == 0, r.stderr
    assert (four / layout.PREDICTIONS).read_bytes() == (one / layout.PREDICTIONS).read_bytes()
    table = pd.read_csv(four / layout.PREDICTIONS)
    assert table["read_reader"].notna().sum() == 1  # the slide's read record came through
    for name in (layout.METRICS_CSV, layout.CONFUSION):
        assert (four / name).read_bytes() == (one / name).read_bytes()
    listing = lambda f: sorted(p.relative_to(f).as_posix() for p in (f / "sorted").rglob("*"))
    assert listing(four) == listing(one) and listing(one)
    assert (four / layout.REPORT).is_file()
    r = merge_cli(four)
    assert r.returncode == 2 and "merged already" in r.stderr


def test_merge_names_unfinished_and_disagreeing_shards(tmp_path):
    results = tmp_path / "r"
    r = merge_cli(results)
    assert r.returncode == 2 and "no shard folders" in r.stderr
    for i in (1, 2):
        folder = layout.shard_folder(results, i, 2)
        folder.mkdir(parents=True)
        (folder / layout.PREDICTIONS).write_text("PATH\n")
        (folder / layout.CONFIG).write_text(f"batch_size: {i}\n")
        (folder / layout.SHARD_RECORD).write_text(json.dumps(
            {"finished": i == 1, "inputs_sha256": "x", "positions": [i - 1], "inputs": 2}))
    r = merge_cli(results)
    assert r.returncode == 2 and "shard 2/2 did not finish" in r.stderr
    shards.finish(layout.shard_folder(results, 2, 2))
    r = merge_cli(results)
    assert r.returncode == 2 and "shards/2-of-2 ran with another settings (batch_size)" in r.stderr


@pytest.mark.slow
def test_a_real_slurm_array_deploys_the_shares_and_merge_joins_them(deploy_inputs, tiny_model,
                                                                    tmp_path):
    """Issue 30: examples/slurm_array.sbatch under a real single-node SLURM (Debian's
    slurm-wlm and munge, started here as root; skipped with the reason where they cannot)."""
    from slurm_cluster import start

    with every_core():  # its daemons and tasks run on every core (the cluster has them all)
        cluster, why = start(tmp_path / "slurm")
    if cluster is None:
        pytest.skip(why)
    try:
        exp = write_yaml(tmp_path / "d.yaml", f"thumbData: {deploy_inputs}\n"
                         f"modelAdr: {tiny_model / 'model.pt'}\nnum_workers: 0\ngradcam: 0\n"
                         "bootstrap: 0\nbatch_size: 1\n")
        one, array = tmp_path / "one", tmp_path / "array"
        r = run_cli("deploy", [str(exp), "--output", str(one)])
        assert r.returncode == 0, r.stderr
        cluster.env.update(PATH=f"{Path(sys.executable).parent}:{cluster.env['PATH']}",
                           PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        done, said = cluster.batch("--array=0-2", "--cpus-per-task=1", "--mem=1G",
                                   f"--output={tmp_path}/task-%a.log", f"--chdir={tmp_path}",
                                   str(ROOT / "examples" / "slurm_array.sbatch"), str(exp),
                                   str(array))
        logs = "".join(p.read_text() for p in sorted(tmp_path.glob("task-*.log")))
        assert done, f"{said}\n{logs}\n{cluster.logs()}"
        assert sorted(p.name for p in (array / "shards").iterdir()) == ["1-of-3", "2-of-3",
                                                                         "3-of-3"]
        said = (array / "shards" / "2-of-3" / layout.RUN_LOG).read_text()
        assert "shard 2/3 (SLURM_ARRAY_TASK_ID=1 of the SLURM array 0-2)" in said
        r = merge_cli(array)
        assert r.returncode == 0, r.stderr
        assert (array / layout.PREDICTIONS).read_bytes() == (one / layout.PREDICTIONS).read_bytes()
    finally:
        cluster.stop()
