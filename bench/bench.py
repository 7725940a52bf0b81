#!/usr/bin/env python3
"""thumbclf benchmark: the model's own limit vs thumbclf end to end, and deploy memory.

    python bench/bench.py [--images 600] [--epochs 3] [--memory 1000,10000] [--device auto]

Prints, in one run:
 1. model only: images/s of forward+backward (training step) and of forward alone (inference),
    on random tensors already in memory, same model, batch size, freezeRatio, threads, device;
 2. thumbclf: training throughput per epoch (first epoch with decoding/caching, later epochs)
    and deployment throughput, end to end from image files (realistic 800-1500 px JPEG/PNG);
 3. the ratios of 2 to 1, and peak memory of deployment for two numbers of images.
Generated data is kept in bench/out/ between runs. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from thumbclf.inputs import synth  # noqa: E402
from thumbclf.core.machine import cores, keep_freed_memory  # noqa: E402
from thumbclf.config import TRAIN, load_params  # noqa: E402
from thumbclf.nn.models import build_model  # noqa: E402
from thumbclf.nn.freeze import freeze
from thumbclf.core.logs import setup_logging  # noqa: E402

OUT = ROOT / "bench" / "out"


LARGE = (800, 1500)  # the long side of a realistic thumbnail, px
SMALL = (200, 500)  # a small thumbnail (issue 29: far from the pipeline's limit before)


def make_data(n: int, sides: tuple[int, int] = LARGE) -> Path:
    """n realistic thumbnails (``sides``: their long side, 800-1500 px by default), half JPEG,
    half PNG, with labels.csv."""
    folder = OUT / (f"data-{n}" if sides == LARGE else f"data-{n}-{sides[0]}-{sides[1]}")
    table = folder / "labels.csv"
    if table.is_file():
        return table
    per = max(1, n // (2 * len(synth.CLASSES)))
    t = time.perf_counter()
    a = synth.generate(folder / "jpg", per_class=per, seed=1, sides=sides, fmt="jpg")
    b = synth.generate(folder / "png", per_class=per, seed=2, sides=sides, fmt="png")
    rows = ["PATH,CLASSIFICATION"]
    for sub, tab in (("jpg", a), ("png", b)):
        rows += [f"{sub}/{line}" for line in tab.read_text().splitlines()[1:]]
    table.write_text("\n".join(rows) + "\n")
    print(f"generated {len(rows) - 1} thumbnails in {time.perf_counter() - t:.0f}s -> {folder}")
    return table


def model_only(device: torch.device, batch: int, freeze_ratio: float, steps: int) -> tuple[float, float]:
    """Images/s of a training step and of inference on random tensors in memory."""
    torch.manual_seed(0)
    model = build_model("resnet18", 6)
    freeze(model, "resnet18", freeze_ratio)
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 6, (batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()
    from thumbclf.nn.training import autocast
    from thumbclf.nn.freeze import train_mode

    def step():
        train_mode(model)
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        opt.step()

    def infer():
        model.eval()
        with torch.inference_mode(), autocast(device):
            model(x)

    rates = []
    for fn in (step, infer):
        fn()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(steps * batch / (time.perf_counter() - t))
    return rates[0], rates[1]


def thumbclf_train(table: Path, epochs: int, batch: int, freeze_ratio: float, device: str) -> dict:
    from thumbclf.workflows.train import run

    out = OUT / "train-run"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    raw = {"thumbData": str(table), "trainFull": True, "pretrained": False, "max_epochs": epochs,
           "stopEpoch": epochs, "patience": epochs, "batch_size": batch, "freezeRatio": freeze_ratio,
           "bootstrap": 0, "val_fraction": 0.1, "device": device, "gradcam": 0}
    exp = OUT / "bench-train.json"
    exp.write_text(json.dumps(raw))
    params = load_params(exp, workflow=TRAIN, output=out)
    setup_logging(out, quiet=True)
    run(params, progress=False)
    import pandas as pd

    hist = pd.read_csv(out / "full" / "history.csv")
    timings = json.loads((out / "timings.json").read_text())
    return {"history": hist, "decode": timings["decode_seconds"], "model": out / "model.pt",
            "n_images": timings["images"]}


def thumbclf_deploy(table_or_folder: Path, model: Path, batch: int, device: str, tag: str,
                    extra: dict | None = None, env: dict | None = None) -> dict:
    """Run deploy in a subprocess (``env``: added to its environment); return its throughput
    and peak memory (main process)."""
    out = OUT / f"deploy-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    exp = OUT / f"deploy-{tag}.json"
    exp.write_text(json.dumps({"thumbData": str(table_or_folder), "modelAdr": str(model),
                               "hasLabels": False, "batch_size": batch, "device": device,
                               "gradcam": 0, **(extra or {})}))
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "deploy_thumbclassifier.py"), str(exp),
                             "--quiet"], cwd=ROOT, env={**os.environ, **(env or {})})
    status = proc.wait()
    wall = time.perf_counter() - t
    if status != 0:
        raise SystemExit(f"deploy failed (status {status})")
    timings = json.loads((out / "timings.json").read_text())
    return {"images": timings["images"], "predict_s": timings["predict_seconds"], "wall_s": wall,
            "peak_rss_mb": timings["peak_memory_mb"], "workers": timings["workers"],
            "inference": timings.get("inference", ""), "folder": out}


def many_links(table: Path, n: int, suffix: str | None = None) -> Path:
    """A flat folder of n hard links to the benchmark images (distinct paths, no extra disk)."""
    size = table.parent.name.removeprefix("data-").partition("-")[2]  # "" for the large ones
    folder = OUT / f"links-{n}{suffix or ''}{'-' + size if size else ''}"
    if folder.is_dir() and sum(1 for _ in folder.iterdir()) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    files = sorted(p for p in table.parent.rglob("*")
                   if p.suffix in ((suffix,) if suffix else (".jpg", ".png")))
    for i in range(n):
        src = files[i % len(files)]
        os.link(src, folder / f"{i:06d}{src.suffix}")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=600, help="thumbnails for training/deploy")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--freeze", type=float, default=0.5)
    ap.add_argument("--memory", default="1000,10000", help="image counts for the memory test ('' = skip)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = ap.parse_args()
    keep_freed_memory()  # the model's limits as a run computes (thumbclf's runs keep it)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(cores())
    OUT.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; resnet18, batch {args.batch}, "
          f"freezeRatio {args.freeze}, channels_last")
    table = make_data(args.images)

    steps = 4 if device.type == "cpu" else 30
    train_limit, infer_limit = model_only(device, args.batch, args.freeze, steps)
    print(f"\n1. model only:  train step {train_limit:7.1f} img/s   inference {infer_limit:7.1f} img/s")

    tr = thumbclf_train(table, args.epochs, args.batch, args.freeze, device.type)
    h = tr["history"]
    print(f"\n2. thumbclf training on {tr['n_images']} files ({args.epochs} epochs, incl. 10% validation):")
    print(f"   decode + cache once: {tr['decode']:.1f}s")
    for _, r in h.iterrows():
        first = r["epoch"] == 1
        total = r["seconds"] + (tr["decode"] if first else 0)
        print(f"   epoch {int(r['epoch'])}: train loop {r['train_images_per_s']:6.1f} img/s "
              f"({r['train_images_per_s'] / train_limit:5.1%} of model limit); epoch with "
              f"validation{' and caching' if first else ''} {total:6.1f}s")
    later = h[h["epoch"] > 1]
    if len(later):
        first_total = h["seconds"].iloc[0] + tr["decode"]
        print(f"   first epoch / later epoch: {first_total / later['seconds'].mean():.2f}x")

    dep = thumbclf_deploy(table, tr["model"], args.batch, device.type, "files")
    rate = dep["images"] / dep["predict_s"]
    print(f"\n   thumbclf deploy on {dep['images']} files ({dep['workers']} decode workers): "
          f"{rate:6.1f} img/s = {rate / infer_limit:5.1%} of model limit "
          f"(whole command incl. start-up and report {dep['wall_s']:.1f}s)")

    for kind in ("jpg", "png"):
        folder = many_links(table, max(1000, args.images), suffix=f".{kind}")
        d = thumbclf_deploy(folder, tr["model"], args.batch, device.type, kind)
        r = d["images"] / d["predict_s"]
        print(f"   {kind.upper()} files only ({d['images']}): {r:6.1f} img/s = "
              f"{r / infer_limit:5.1%} of model limit")

    if args.memory:
        print("\n3. deployment peak memory (main process, VmHWM):")
        for n in [int(v) for v in args.memory.split(",") if v]:
            d = thumbclf_deploy(many_links(table, n), tr["model"], args.batch, device.type, f"mem{n}")
            print(f"   {n:6d} images: {d['peak_rss_mb']:7.0f} MB peak RSS, "
                  f"{d['images'] / d['predict_s']:6.1f} img/s")
    print(f"\npeak memory of this benchmark process: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
