"""Training and inference throughput of the prototype's backbones at their input sizes.

    python bench/backbones.py [--batch 4] [--steps 3] [--names resnet18,vgg] [--device cpu]

Each backbone is built as thumbclf trains it (no pretrained weights needed: the speed is the
same), with freezeRatio 0.5, channels-last, on random tensors already in memory, so the numbers
are the model's own limit (decoding excluded). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from thumbclf.nn.training import autocast, training_loss  # noqa: E402
from thumbclf.core.backbones import PROTOTYPE_NAMES
from thumbclf.nn.models import build_model, input_size
from thumbclf.nn.freeze import freeze, train_mode


def measure(name: str, *, batch: int, steps: int, device: torch.device) -> dict:
    """Images/s of a training step and of inference for one backbone."""
    torch.manual_seed(0)
    model = build_model(name, 6)
    frozen = freeze(model, name, 0.5)
    model = model.to(device).to(memory_format=torch.channels_last)
    side = input_size(name)
    x = torch.randn(batch, 3, side, side, device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 6, (batch,), device=device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        train_mode(model)
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            _, loss = training_loss(model(x), y, loss_fn)
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
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(steps * batch / (time.perf_counter() - start))
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"name": name, "arch": PROTOTYPE_NAMES[name], "size": side,
            "params": params / 1e6, "trainable": trainable / 1e6, "frozen": len(frozen),
            "train": rates[0], "infer": rates[1]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--names", default=",".join(PROTOTYPE_NAMES))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"batch {args.batch}, {args.steps} timed steps after one warm-up\n")
    print("| model_name | architecture | input px | parameters (M) | trainable at freezeRatio 0.5 (M) "
          "| training images/s | inference images/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.names.split(","):
        r = measure(name, batch=args.batch, steps=args.steps, device=device)
        print(f"| `{r['name']}` | {r['arch']} | {r['size']} | {r['params']:.1f} | "
              f"{r['trainable']:.1f} | {rate(r['train'])} | {rate(r['infer'])} |", flush=True)


def rate(value: float) -> str:
    """Images/s with one decimal, or two significant digits below 1."""
    return f"{value:.1f}" if value >= 1 else f"{value:.2g}"


if __name__ == "__main__":
    main()
