#!/usr/bin/env python3
"""Deployment speed by inference engine and precision, end to end from files, on this machine.

    python bench/inference.py [--images 2000] [--epochs 2]

For each engine/precision that this machine supports: images/s of a whole deploy (decoding in
workers, inference, writing rows) on JPEG-only and PNG-only folders of realistic 800-1500 px
thumbnails, as a ratio to PyTorch fp32's model-only limit measured in the same run, plus the
quality gate's figures (verified on the training data's labels). Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402

from thumbclf.predict import inference  # noqa: E402

COMBOS = [("torch", "fp32"), ("torch", "bf16"), ("openvino", "fp32"), ("openvino", "bf16"),
          ("openvino", "int8")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000, help="JPEG and PNG thumbnails each")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    B.OUT.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(B.cores())
    table = B.make_data(min(args.images, 600))  # training data (labelled), also the gate's
    _, limit = B.model_only(torch.device("cpu"), args.batch, 0.5, 4)
    print(f"PyTorch fp32 model-only limit: {limit:.1f} img/s (resnet18, batch {args.batch}, "
          f"{B.cores()} threads); CPU flags: bf16 {inference.native('bf16', torch.device('cpu'))}, "
          f"int8 {inference.native('int8', torch.device('cpu'))}; OpenVINO "
          f"{inference.openvino_version() or 'not installed'}")
    model = B.thumbclf_train(table, args.epochs, args.batch, 0.5, "cpu")["model"]
    folders = {kind: B.many_links(table, args.images, suffix=f".{kind}") for kind in ("jpg", "png")}
    print(f"\n{'engine':10} {'precision':9} {'JPEG img/s':>11} {'x limit':>8} {'PNG img/s':>10} "
          f"{'x limit':>8}  quality gate")
    for engine, precision in COMBOS:
        if engine == "openvino" and inference.openvino_version() is None:
            continue
        if not inference.native(precision, torch.device("cpu")):
            print(f"{engine:10} {precision:9} not native on this CPU: skipped")
            continue
        rates, note = {}, ""
        for kind, folder in folders.items():
            try:
                d = B.thumbclf_deploy(folder, model, args.batch, "cpu", f"{engine}-{precision}-{kind}",
                                      extra={"engine": engine, "precision": precision,
                                             "verify_data": str(table)})
            except SystemExit as exc:
                note = f"refused ({exc}); see bench/out/deploy-{engine}-{precision}-{kind}/run.log"
                break
            rates[kind] = d["images"] / d["predict_s"]
            note = d["inference"]
        cells = "".join(f" {rates[k]:10.1f} {rates[k] / limit:7.2f}x" if k in rates else
                        f" {'-':>10} {'-':>8}" for k in ("jpg", "png"))
        print(f"{engine:10} {precision:9}{cells}  {note}")
    print(json.dumps({"limit": limit}))


if __name__ == "__main__":
    main()
