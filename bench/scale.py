#!/usr/bin/env python3
"""Deployment with executor: ray against the local path, same images, same decoding workers.

    python bench/scale.py [--images 2000] [--workers 1] [--batch 64] [--repeat 1]

Generates realistic thumbnails (bench.py's: 800-1500 px, half JPEG, half PNG; kept in
bench/out/), writes an untrained ResNet-18 model file (the speed does not depend on the
weights) and runs the deploy command twice, as a user would: ``executor: local`` and
``executor: ray`` (a local Ray instance started by the run). Prints the wall time of each
(command start to exit, so Ray's start-up and shutdown are included), Ray's start-up on its
own, the prediction throughput, and the ratio ray/local. Results also go to bench/out/scale.json.
Not a test: the numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench import OUT, make_data  # noqa: E402


def model_file() -> Path:
    """An untrained ResNet-18 in thumbclf's model format (7 classes)."""
    from thumbclf.inputs import synth
    from thumbclf.nn.data import IMAGENET
    from thumbclf.inputs.images import Preprocessing
    from thumbclf.nn.models import LoadedModel, build_model, save_model

    path = OUT / "scale-model.pt"
    if not path.is_file():
        classes = tuple(synth.CLASSES)
        save_model(path, LoadedModel(build_model("resnet18", len(classes), False), "resnet18",
                                     classes, Preprocessing(size=224), IMAGENET, threshold=0.9,
                                     meta={"note": "untrained, for bench/scale.py"}))
    return path


def deploy(table: Path, model: Path, *, executor: str, workers: int, batch: int) -> dict:
    out = OUT / f"scale-{executor}"
    shutil.rmtree(out, ignore_errors=True)
    exp = OUT / f"scale-{executor}.json"
    exp.write_text(json.dumps({"thumbData": str(table), "modelAdr": str(model),
                               "hasLabels": False, "batch_size": batch, "num_workers": workers,
                               "gradcam": 0, "bootstrap": 0, "executor": executor,
                               "device": "cpu"}))
    t = time.perf_counter()
    status = subprocess.call([sys.executable, str(ROOT / "deploy_thumbclassifier.py"), str(exp),
                              "--quiet"], cwd=ROOT)
    wall = time.perf_counter() - t
    if status != 0:
        raise SystemExit(f"deploy with executor: {executor} failed (status {status})")
    timings = json.loads((out / "timings.json").read_text())
    rows = sum(1 for _ in open(out / "predictions.csv")) - 1
    return {"executor": executor, "images": timings["images"], "rows": rows, "wall_s": wall,
            "predict_s": timings["predict_seconds"],
            "ray_start_s": timings.get("ray_start_seconds"),
            "images_per_s": timings["images"] / timings["predict_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=1, help="decoding workers, for both paths")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="alternate the two paths this often")
    args = ap.parse_args()
    table = make_data(args.images)
    model = model_file()
    runs = []
    for _ in range(args.repeat):
        for executor in ("local", "ray"):
            r = deploy(table, model, executor=executor, workers=args.workers, batch=args.batch)
            runs.append(r)
            print(f"{executor:5s}: {r['images']} images, wall {r['wall_s']:.1f}s, predicting "
                  f"{r['predict_s']:.1f}s ({r['images_per_s']:.1f} images/s)"
                  + (f", Ray start-up {r['ray_start_s']:.1f}s" if r["ray_start_s"] else ""),
                  flush=True)
    local = min(r["wall_s"] for r in runs if r["executor"] == "local")
    ray = min(r["wall_s"] for r in runs if r["executor"] == "ray")
    start = min(r["ray_start_s"] for r in runs if r["executor"] == "ray")
    print(f"ray / local wall time: {ray / local:.2f}x (target <= 1.25x); Ray start-up "
          f"{start:.1f}s of it; without start-up {(ray - start) / local:.2f}x")
    (OUT / "scale.json").write_text(json.dumps({"runs": runs, "ratio": ray / local,
                                                "workers": args.workers}, indent=1))


if __name__ == "__main__":
    main()
