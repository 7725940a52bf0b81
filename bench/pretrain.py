#!/usr/bin/env python3
"""Does self-supervised pretraining on unlabelled thumbnails help? Synthetic data, CPU-sized.

    python bench/pretrain.py [--unlabelled 600] [--epochs 10] [--size 64] [--train-epochs 15]

1. Generates unlabelled synthetic thumbnails (thumbclf.inputs.synth, 6 slide types), a labelled pool
   and a separate labelled test set (30 per class), all with different seeds.
2. Pretrains a ResNet-18 with the pretraining workflow (BYOL) on the unlabelled images and
   times it.
3. Trains with 5 and with 20 labelled images per class, from scratch and from the SSL
   checkpoint (fine-tuning everything, and with the backbone frozen), the same epochs and
   settings, and reports macro AUROC (one-vs-rest) and accuracy on the test set.

The input size is smaller than the backbone's 224 px (--size) so that it runs in minutes on
2 cores; the workflow's API allows that for benchmarks, training refuses such a checkpoint.
Writes bench/out/pretrain/ and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, roc_auc_score
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from thumbclf.inputs import cache, synth  # noqa: E402
from thumbclf.config import PRETRAIN, load_params  # noqa: E402
from thumbclf.nn.data import IMAGENET, training_batches  # noqa: E402
from thumbclf.nn.training import (EarlyStopping, FitSpec, predict_logits,  # noqa: E402
                                  recalibrate_bn, train_one_epoch)
from thumbclf.inputs.images import Preprocessing  # noqa: E402
from thumbclf.nn.models import SSL_CHECKPOINT, build_model, load_ssl  # noqa: E402
from thumbclf.nn.freeze import freeze, train_mode
from thumbclf.workflows.pretrain import run as pretrain_run  # noqa: E402
from thumbclf.workflows.run import prepare_output  # noqa: E402
from thumbclf.core.logs import setup_logging

OUT = ROOT / "bench" / "out" / "pretrain"
CPU = torch.device("cpu")


def images(folder: Path, per_class: int, seed: int, size: int):
    """Generate labelled synthetic thumbnails; return decoded uint8 images and class indices."""
    synth.generate(folder, per_class=per_class, seed=seed, sides=(200, 500))
    paths = sorted(folder.rglob("*.jpg"))
    y = np.array([synth.CLASSES.index(p.parent.name) for p in paths])
    decoded = cache.build(paths, Preprocessing(size=size), mode="memory", workers=2, progress=False)
    return decoded, y


def train_and_test(pool, y_pool, test, y_test, *, per_class: int, init: str, ckpt: Path | None,
                   size: int, epochs: int, seed: int) -> dict:
    """Train a ResNet-18 on ``per_class`` images per class; macro AUROC and accuracy on test."""
    rng = np.random.default_rng(seed)
    pos = np.concatenate([rng.permutation(np.flatnonzero(y_pool == c))[:per_class]
                          for c in range(len(synth.CLASSES))])
    torch.manual_seed(seed)
    model = build_model("resnet18", len(synth.CLASSES), False)
    if init != "scratch":
        load_ssl(model, ckpt, "resnet18", input_size=size)
    freeze(model, "resnet18", 0.9 if init == "ssl, backbone frozen" else 0.0)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                           weight_decay=1e-4)
    norm = IMAGENET
    gen = torch.Generator().manual_seed(seed)
    bs = 16
    spec = FitSpec(train_batches=lambda: training_batches(pool, pos, y_pool, batch_size=bs,
                                                          rng=rng),
                   val_batches=lambda: [], n_train_batches=-(-len(pos) // bs), optimizer=opt,
                   criterion=nn.CrossEntropyLoss(), val_criterion=nn.CrossEntropyLoss(),
                   stopper=EarlyStopping(epochs, epochs, epochs), norm=norm, device=CPU, gen=gen)
    for _ in range(epochs):
        train_one_epoch(model, spec.train_batches(), spec=spec, progress=False)
    train_mode(model)
    recalibrate_bn(model, training_batches(pool, pos, y_pool, batch_size=bs, rng=None),
                   norm=norm, device=CPU)
    logits, _ = predict_logits(model, training_batches(
        test, np.arange(len(y_test)), y_test, batch_size=64, rng=None,
        drop_single=False), norm=norm, device=CPU)
    prob = torch.softmax(torch.from_numpy(logits), 1).numpy()
    return {"auroc": roc_auc_score(y_test, prob, multi_class="ovr", average="macro"),
            "accuracy": accuracy_score(y_test, prob.argmax(1))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--unlabelled", type=int, default=600, help="unlabelled images (pretraining)")
    ap.add_argument("--epochs", type=int, default=10, help="pretraining epochs")
    ap.add_argument("--batch", type=int, default=64, help="pretraining batch size")
    ap.add_argument("--size", type=int, default=64, help="input size in pixels")
    ap.add_argument("--train-epochs", type=int, default=15, help="supervised epochs")
    ap.add_argument("--seeds", type=int, default=2, help="label draws/initialisations averaged")
    ap.add_argument("--reuse", type=Path, help="a finished pretraining results folder (made by "
                    "this script at the same --size): skip pretraining, compare only")
    a = ap.parse_args()
    if a.reuse is None:
        shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cache.default_workers(-1))
    pool, y_pool = images(OUT / "pool", 20, 12, a.size)
    test, y_test = images(OUT / "test", 30, 13, a.size)
    if a.reuse is None:
        per = -(-a.unlabelled // len(synth.CLASSES))
        unl_table = synth.generate(OUT / "unlabelled", per_class=per, seed=11, sides=(200, 500))
        exp = OUT / "pretrain.yaml"
        exp.write_text(f"thumbData: {unl_table.parent}\nmax_epochs: {a.epochs}\n"
                       f"batch_size: {a.batch}\nnum_workers: 2\n")
        params = load_params(exp, workflow=PRETRAIN)
        prepare_output(params.output, resume=False)
        setup_logging(params.output, quiet=True)
        start = time.perf_counter()
        pretrain_run(params, progress=False, input_size=a.size)
        wall = time.perf_counter() - start
        folder = params.output
    else:
        folder = a.reuse
    ckpt = folder / SSL_CHECKPOINT
    import pandas as pd

    hist = pd.read_csv(folder / "history.csv")
    rows = []
    for per_class in (5, 20):
        for init in ("scratch", "ssl, fine-tuned", "ssl, backbone frozen"):
            runs = [train_and_test(pool, y_pool, test, y_test, per_class=per_class, init=init,
                                   ckpt=ckpt, size=a.size, epochs=a.train_epochs, seed=s)
                    for s in range(1, a.seeds + 1)]
            rows.append({"labels per class": per_class, "start": init,
                         "macro AUROC": np.mean([r["auroc"] for r in runs]),
                         "accuracy": np.mean([r["accuracy"] for r in runs]),
                         "runs": " / ".join(f"{r['auroc']:.3f}, {r['accuracy']:.3f}" for r in runs)})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f")
    import json

    timings = json.loads((folder / "timings.json").read_text())
    if a.reuse is not None:
        wall = timings["total_seconds"]
    summary = (f"pretraining: {timings['images']} unlabelled images, {a.size} px, {a.epochs} "
               f"epochs, batch {a.batch}: {wall:.0f} s wall (decoding {timings['decode_seconds']:.0f}"
               f" s, epochs {timings['pretrain_seconds_all_epochs']:.0f} s), "
               f"loss {hist['loss'].iloc[0]:.3f} -> {hist['loss'].iloc[-1]:.3f}; supervised: "
               f"{a.train_epochs} epochs, test set {len(y_test)} images, {a.seeds} seeds")
    (OUT / "pretrain.md").write_text(summary + "\n\n" + table + "\n")
    print(summary)
    print(table)


if __name__ == "__main__":
    main()
