#!/usr/bin/env python3
"""What the decision step's look statistics (tissue, glass, stain, texture: nn/look.py) cost
beside the model, per batch of the deploy stream.

    python bench/look.py [--batch 64] [--size 224] [--repeats 10] [--model resnet18]

Times ``look.describe`` and the model's PyTorch fp32 forward pass (channels-last, inference
mode, the torch threads of this machine) on the same uint8 batch of synthetic thumbnails, and
prints both and their ratio: the share of deploy throughput the look part can cost at most
(decoding, which runs beside them in worker processes, is left out, so the real share is
smaller).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from thumbclf.inputs import synth  # noqa: E402
from thumbclf.inputs.decode import load_array  # noqa: E402
from thumbclf.inputs.images import Preprocessing  # noqa: E402
from thumbclf.nn import look  # noqa: E402
from thumbclf.nn.data import IMAGENET, to_input  # noqa: E402
from thumbclf.nn.models import build_model  # noqa: E402


def timed(fn, repeats: int) -> float:
    """The median seconds of ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--model", default="resnet18")
    a = ap.parse_args()
    out = ROOT / "bench" / "out" / "look"
    table = synth.generate(out / "data", per_class=max(2, a.batch // 6 + 1), seed=5,
                           sides=(200, 600))
    prep = Preprocessing(size=a.size)
    paths = sorted(table.parent.rglob("*.jpg"))[:a.batch]
    x = torch.from_numpy(np.stack([load_array(p, prep) for p in paths]))
    model = build_model(a.model, 6, pretrained=False).eval().to(memory_format=torch.channels_last)

    def forward():
        with torch.inference_mode():
            model(to_input(x, IMAGENET, torch.device("cpu")))

    model_s = timed(forward, a.repeats)
    look_s = timed(lambda: look.describe(x), a.repeats)
    print(f"{len(x)} images of {a.size} px, {torch.get_num_threads()} torch threads: model "
          f"{model_s * 1000:.0f} ms ({len(x) / model_s:.1f} images/s), look statistics "
          f"{look_s * 1000:.1f} ms ({look_s / len(x) * 1000:.2f} ms an image): "
          f"{look_s / model_s:.1%} of the model's time")


if __name__ == "__main__":
    main()
