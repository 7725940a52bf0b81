"""torchrun: one model trained by two processes (DDP, gloo on the CPU)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch.distributed as dist

from conftest import ROOT, write_yaml
from thumbclf.nn import distributed

pytestmark = pytest.mark.slow

# Runs the training script as torchrun would, and records for the test what each rank trained
# on (a hash per image) and the weights it ended with (a hash per fold).
RECORDER = textwrap.dedent('''
    import hashlib, json, os, sys
    import thumbclf.nn.training as engine, thumbclf.workflows.train as training
    from thumbclf import cli

    seen, weights = [], {}  # images per epoch (in order), weights per fold
    train_one_epoch, run_fold = engine.train_one_epoch, training.run_fold

    def recording_epoch(model, batches, **kwargs):
        seen.append(set())
        def watched():
            for x, y in batches:
                seen[-1].update(hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in x)
                yield x, y
        return train_one_epoch(model, watched(), **kwargs)

    def recording_fold(*args, **kwargs):
        result = run_fold(*args, **kwargs)
        state = result.model.state_dict()
        weights[result.fold] = hashlib.sha1(b"".join(
            state[k].detach().cpu().numpy().tobytes() for k in sorted(state))).hexdigest()
        return result

    engine.train_one_epoch, training.run_fold = recording_epoch, recording_fold
    try:
        cli.train_main()
    finally:
        with open(os.path.join(os.environ["TRACE"], f"rank{os.environ['RANK']}.json"), "w") as f:
            json.dump({"seen": [sorted(e) for e in seen], "weights": weights}, f)
''')


def torchrun(*args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", *args], capture_output=True, text=True,
                          timeout=600, env=env)


GLOO = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                          reason="this PyTorch build has no torch.distributed with gloo")
CV = ("foldNumber: 2\npretrained: false\nbatch_size: 8\nmax_epochs: 2\nstopEpoch: 0\n"
      "patience: 1\nbootstrap: 0\nnum_workers: 0\ngradcam: 0\n")


@pytest.fixture(scope="module")
def recorded(tiny_data, tmp_path_factory):
    """One cross-validation trained by torchrun on two processes, with what each rank trained
    on and the weights it ended with: (results folder, traces, process). Issue 32: it is also
    the uninterrupted reference of the resumed training (one torchrun training fewer)."""
    folder = tmp_path_factory.mktemp("ddp")
    script = folder / "recorder.py"
    script.write_text(RECORDER)
    trace = folder / "trace"
    trace.mkdir()
    exp = write_yaml(folder / "ddp.yaml", f"thumbData: {tiny_data}\n{CV}")
    return folder / "ddp", trace, torchrun(str(script), str(exp), env_extra={"TRACE": str(trace)})


@GLOO
def test_torchrun_trains_one_model_on_two_cpu_processes(recorded):
    out, trace, r = recorded
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("config.yaml", "splits.csv", "predictions.csv", "report.html", "metrics.json",
                 "fold_1/model.pt", "fold_2/model.pt", "fold_1/history.csv"):
        assert (out / name).is_file(), name
    log = (out / "run.log").read_text()
    assert log.count("thumbclf train:") == 1 and "torchrun: 2 processes" in log  # written once
    assert len(pd.read_csv(out / "predictions.csv")) == 18
    assert not list(out.rglob("*.tmp*")) and not (out / "fold_1" / "checkpoint.pt").exists()
    assert r.stdout.count("done in") + r.stderr.count("done in") == 1  # one rank logs
    ranks = [json.loads((trace / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 4  # 2 folds x 2 epochs
    for seen0, seen1 in zip(ranks[0]["seen"], ranks[1]["seen"]):  # each epoch:
        assert seen0 and seen1 and not set(seen0) & set(seen1)  # each rank its own images
    assert ranks[0]["weights"] == ranks[1]["weights"] and len(ranks[0]["weights"]) == 2


def test_torchrun_refuses_deploy_in_one_line(tmp_path):
    # rank 0 starts late: rank 1 meets the error first, and its exit must not let torchrun stop
    # rank 0 before rank 0 has said why (it did in CI)
    script = tmp_path / "late_rank0.py"
    script.write_text("import os, time\nfrom thumbclf.cli import deploy_main\n"
                      "time.sleep(3 if os.environ['RANK'] == '0' else 0)\ndeploy_main()\n")
    exp = write_yaml(tmp_path / "d.yaml", "thumbData: x\nmodelAdr: m.pt\n")
    r = torchrun(str(script), str(exp))
    assert r.returncode != 0 and "interrupted" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {exp}: torchrun trains one model on several GPUs/processes; run "
                     "deploy as one process (or with executor: ray for many machines)"]


def test_batches_are_shared_out_and_the_loss_is_averaged(monkeypatch):
    sel = np.arange(7)
    assert distributed.shard(sel) is sel and distributed.mean(0.5) == 0.5  # one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.shard(sel).tolist() == [1, 3, 5]
    assert distributed.shard(np.arange(3)) is None  # too small for two images per rank


INTERRUPTER = textwrap.dedent('''
    import os, sys, time
    import thumbclf.nn.training as engine
    from thumbclf import cli

    calls, real = [], engine.train_one_epoch

    def epoch(*args, **kwargs):  # rank 1 dies as its second epoch begins (after checkpoint 1)
        calls.append(1)
        if len(calls) == 2 and os.environ["RANK"] == "1" and os.environ.get("KILL_RANK"):
            deadline = time.time() + 300  # rank 0 writes the checkpoint (atomically) meanwhile,
            while not os.path.isfile(os.environ["KILL_RANK"]) and time.time() < deadline:
                time.sleep(0.05)  # then waits for this rank; polled, not a fixed 20 s sleep
            os._exit(9)
        return real(*args, **kwargs)

    engine.train_one_epoch = epoch
    cli.train_main()
''')


@GLOO
def test_a_resumed_ddp_training_gives_the_uninterrupted_model(recorded, tiny_data, tmp_path):
    """Issue 24.15: after a rank was killed, --resume used rank 0's augmentation stream on
    every rank; each rank's generators are now in the checkpoint. Rank 1 dies as fold 1's
    second epoch begins; the uninterrupted reference is the module's recorded run of the same
    settings (recording what the ranks see changes nothing they compute)."""
    import torch

    whole, _, ran = recorded
    assert ran.returncode == 0, ran.stdout + ran.stderr
    script = tmp_path / "interrupter.py"
    script.write_text(INTERRUPTER)
    cut = write_yaml(tmp_path / "cut.yaml", f"thumbData: {tiny_data}\n{CV}")
    checkpoint = tmp_path / "cut" / "fold_1" / "checkpoint.pt"
    assert torchrun(str(script), str(cut), env_extra={"KILL_RANK": str(checkpoint)}).returncode != 0
    assert checkpoint.is_file() and not (tmp_path / "cut" / "fold_1" / "model.pt").exists()
    r = torchrun(str(script), str(cut), "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fold 1: continuing after epoch 1" in (tmp_path / "cut" / "run.log").read_text()
    for fold in ("fold_1", "fold_2"):
        a = torch.load(whole / fold / "model.pt", weights_only=True)["state_dict"]
        b = torch.load(tmp_path / "cut" / fold / "model.pt", weights_only=True)["state_dict"]
        pa, pb = (pd.read_csv(run / fold / "predictions.csv") for run in (whole, tmp_path / "cut"))
        gap = float((pa[["Biopsy", "IHC", "TMA"]] - pb[["Biopsy", "IHC", "TMA"]]).abs().max().max())
        assert all(torch.equal(a[k], b[k]) for k in a), \
            f"{fold}: probabilities differ by up to {gap:.3g}"
