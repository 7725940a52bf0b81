#!/usr/bin/env python3
"""Where a deploy's and a training's time goes, on 1 and on 2 cores (issue 29, items 3 and 4).

    python bench/where.py [--images 600] [--kind jpg] [--cores 1,2] [--precision auto]
                            [--train] [--epochs 3]

Each run is a fresh process limited to the first C cores (its affinity: the decoding worker
and the engine's threads share them), profiled with cProfile in its main process. A deploy's
prediction step (timings.json) splits into: the engine's passes, the input conversion, the
look statistics, the unfamiliar rule's neighbours, waiting for decoded images (the decoding
itself runs in the worker process), the decision and the rows, and the rest (per-batch Python,
start-up of the stream). The default deploy is profiled after a first one has cached the
engine and its verdict, as a user's later deploys run; the first deploy's extra time (the
conversion and the verification) is stated beside it. ``--train``: a ``trainFull`` run of
``--epochs`` on the bench's 280 thumbnails, split into the training steps (of which
augmentation, cache reads and input conversion), the validation passes, the unfamiliar rule's
feature passes, calibration, the fold's table, report and plots, and decoding once.

Uses bench/out from bench/inference.py (its model and thumbnails); not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402

DEPLOY = {  # category: (file ending, function) whose cumulative time it is
    "engine (model passes)": [("predict/inference.py", "__call__")],
    "input conversion": [("nn/data.py", "to_input")],
    "look statistics": [("nn/look.py", "describe")],
    "unfamiliar rule (neighbours)": [("nn/familiarity.py", "distances")],
    "waiting for decoded images": [("utils/data/dataloader.py", "_next_data")],
    "decision and rows": [("core/decide.py", "decide_with_reasons"),
                          ("core/files.py", "append_whole")],
}
TRAIN = {
    "training steps": [("nn/training.py", "train_one_epoch")],
    "  of which augmentation": [("nn/augment.py", "augment")],
    "  of which cache reads": [("inputs/cache.py", "get")],
    "  of which input conversion": [("nn/data.py", "to_input")],
    "validation passes": [("nn/training.py", "evaluate")],
    "unfamiliar rule (feature passes, fit)": [("nn/familiarity.py", "training_looks"),
                                              ("nn/familiarity.py", "fit"),
                                              ("nn/training.py", "_features_state")],
    "calibration": [("nn/calibration.py", "fit_temperature")],
    "the fold's predictions table": [("workflows/train.py", "_fold_table")],
    "report, plots, model file": [("workflows/train.py", "_evaluate"),
                                  ("nn/models.py", "save_model")],
    "decoding once (into the cache)": [("inputs/cache.py", "_run_jobs")],
}


def cumulative(stats: pstats.Stats, wanted: list[tuple[str, str]]) -> float:
    return sum(ct for (path, _, name), (_, _, _, ct, _) in stats.stats.items()
               for end, fn in wanted if path.endswith(end) and name == fn)


def child(args) -> None:
    """One profiled run on the first ``args.cores`` cores; prints a JSON line."""
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:args.cores]))
    from thumbclf.cli import main

    out = B.OUT / f"profile-{args.what}-{args.cores}"
    shutil.rmtree(out, ignore_errors=True)
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    status = main(args.what, [str(args.experiment), "--quiet", "--output", str(out)])
    prof.disable()
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{args.what} failed ({status})")
    stats = pstats.Stats(prof)
    timings = json.loads((out / "timings.json").read_text())
    parts = DEPLOY if args.what == "deploy" else TRAIN
    found = {k: round(cumulative(stats, v), 2) for k, v in parts.items()}
    total = timings["predict_seconds"] if args.what == "deploy" else timings["total_seconds"]
    print(json.dumps({"cores": args.cores, "wall": round(wall, 2), "timed": round(total, 2),
                      "images": timings.get("images"), "inference": timings.get("inference"),
                      "parts": found}))


def run(what: str, experiment: Path, cores: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", what, "--experiment",
                          str(experiment), "--cores", str(cores)], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def show(title: str, runs: list[dict], top: set[str]) -> None:
    print(f"\n{title}")
    print("| part | " + " | ".join(f"{r['cores']} core{'s' * (r['cores'] > 1)}" for r in runs)
          + " |")
    print("| --- |" + " --- |" * len(runs))
    for name in runs[0]["parts"]:
        print(f"| {name} | " + " | ".join(
            f"{r['parts'][name]:.1f} s ({100 * r['parts'][name] / r['timed']:.0f}%)"
            for r in runs) + " |")
    print("| the rest | " + " | ".join(
        f"{r['timed'] - sum(v for k, v in r['parts'].items() if k in top):.1f} s" for r in runs)
        + " |")
    print("| timed in all | " + " | ".join(f"{r['timed']:.1f} s" for r in runs) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--kind", default="jpg", choices=["jpg", "png"])
    ap.add_argument("--cores", default="1,2")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--child", choices=["deploy", "train"])
    ap.add_argument("--experiment", type=Path)
    args = ap.parse_args()
    if args.child:
        args.what, args.cores = args.child, int(args.cores)
        return child(args)
    model = B.OUT / "train-run" / "model.pt"
    if not model.is_file():
        raise SystemExit(f"{model}: run python bench/inference.py first (it trains the model)")
    cores = [int(c) for c in args.cores.split(",")]
    folder = B.many_links(B.make_data(280), args.images, suffix=f".{args.kind}")
    cache = B.OUT / f"profile-cache-{args.kind}"
    exp = B.OUT / "profile-deploy.json"
    exp.write_text(json.dumps({"thumbData": str(folder), "modelAdr": str(model),
                               "hasLabels": False, "batch_size": 64, "device": "cpu",
                               "gradcam": 0, "precision": args.precision,
                               "cache_dir": str(cache)}))
    shutil.rmtree(cache, ignore_errors=True)  # the first deploy converts and verifies afresh
    first = run("deploy", exp, max(cores))  # (both then cached)
    runs = [run("deploy", exp, c) for c in cores]
    later = runs[cores.index(max(cores))]
    extra = first["timed"] - later["timed"]
    print(f"first deploy ({max(cores)} cores): {first['timed']:.1f} s, a later one "
          f"{later['timed']:.1f} s: conversion and verification {extra:.1f} s, "
          f"{100 * extra / first['timed']:.0f}% of the first deploy's prediction step")
    print(f"deploy of {args.images} {args.kind.upper()} files, precision {args.precision}: "
          f"{'; '.join(r['inference'] for r in runs)}")
    show("main process, during the prediction step", runs, set(DEPLOY))
    print("\n" + " ".join(f"{r['cores']} cores: {r['images'] / r['timed']:.1f} img/s;"
                          for r in runs))
    if args.train:
        texp = B.OUT / "profile-train.json"
        texp.write_text(json.dumps({"thumbData": str(B.make_data(280)),
                                    "trainFull": True, "pretrained": False,
                                    "max_epochs": args.epochs, "stopEpoch": args.epochs,
                                    "patience": args.epochs, "batch_size": 64, "bootstrap": 0,
                                    "freezeRatio": 0.5, "val_fraction": 0.1, "device": "cpu",
                                    "gradcam": 0}))
        truns = [run("train", texp, c) for c in cores]
        show(f"training (trainFull, {args.epochs} epochs, 280 thumbnails), main process",
             truns, {k for k in TRAIN if not k.startswith(" ")})


if __name__ == "__main__":
    main()
