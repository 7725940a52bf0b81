#!/usr/bin/env python3
"""Each decision feature on and off, on the demo data: macro AUROC, accuracy, coverage, ECE.

    python bench/compare.py [--imbalanced]

Trains the demo cross-validation once per variant (same seed and splits) and deploys on the
demo's deploy set with one fold model, the fold ensemble, and the ensemble with TTA. Prints a
Markdown table (also written to bench/out/compare.md). Takes about 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "compare"
DEMO = ROOT / "experiments"


def run(script: str, exp: Path, out: Path, *sets: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = [sys.executable, str(ROOT / script), str(exp), "--output", str(out), "--quiet"]
    for s in sets:
        args += ["--set", s]
    subprocess.run(args, check=True, cwd=ROOT)
    return json.loads((out / "metrics.json").read_text())["all"]


def imbalanced_table() -> Path:
    """The demo training table with Fat and TMA cut to 4 images each."""
    df = pd.read_csv(DEMO / "demo_data" / "train" / "labels.csv")
    rare = df["CLASSIFICATION"].isin(["Fat", "TMA"])
    df = pd.concat([df[~rare], df[rare].groupby("CLASSIFICATION").head(4)])
    df["PATH"] = [str(DEMO / "demo_data" / "train" / p) for p in df["PATH"]]
    OUT.mkdir(parents=True, exist_ok=True)
    df.to_csv(OUT / "imbalanced.csv", index=False)
    return OUT / "imbalanced.csv"


def row(name: str, m: dict) -> dict:
    return {"variant": name, "macro AUROC (ovo)": m["macro_auroc_ovo"],
            "accuracy (decided)": m["accuracy_decided"], "accuracy (Undecided = wrong)": m["accuracy_all"],
            "coverage": m["coverage"], "ECE": m["ece"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--imbalanced", action="store_true", help="also compare class_balance on an "
                    "imbalanced version of the demo data")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    train_exp, deploy_exp = DEMO / "demo_train.yaml", DEMO / "demo_deploy.yaml"
    rows = []
    variants = [("defaults (augment, class-weighted loss, calibration)", []),
                ("augment off", ["augment=false"]),
                ("class_balance none", ["class_balance=none"]),
                ("class_balance sampler", ["class_balance=sampler"]),
                ("calibrate off", ["calibrate=false"])]
    for i, (name, sets) in enumerate(variants):
        m = run("train_thumbclassifier.py", train_exp, OUT / f"train{i}", *sets)
        rows.append(row(f"CV: {name}", m))
        print(rows[-1], flush=True)
    base = OUT / "train0"
    for name, sets in [("deploy: one fold model", [f"modelAdr={base / 'fold_1' / 'model.pt'}"]),
                       ("deploy: ensemble of 3 fold models", [f"modelAdr={base}"]),
                       ("deploy: ensemble + TTA", [f"modelAdr={base}", "tta=true"])]:
        m = run("deploy_thumbclassifier.py", deploy_exp, OUT / f"deploy{len(rows)}",
                *sets, "sortThumbs=false")
        rows.append(row(name, m))
        print(rows[-1], flush=True)
    if args.imbalanced:
        table = imbalanced_table()
        for name, sets in [("imbalanced CV: class_balance none", ["class_balance=none"]),
                           ("imbalanced CV: class_balance loss", ["class_balance=loss"]),
                           ("imbalanced CV: class_balance sampler", ["class_balance=sampler"])]:
            m = run("train_thumbclassifier.py", train_exp, OUT / f"imb{len(rows)}",
                    f"thumbData={table}", *sets)
            rows.append(row(name, m))
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    md = df.to_markdown(index=False, floatfmt=".3f") if _has_tabulate() else df.to_string(index=False)
    (OUT.parent / "compare.md").write_text(md + "\n")
    print(md)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
