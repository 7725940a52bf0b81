#!/usr/bin/env python3
"""Can "Undecided" be trusted under another lab's look and for slide types never seen?

    python bench/trust.py [--per-class 50] [--shifts 1.0,2.0] [--holdout TMA] [--max-epochs 12]
                          [--variants main,default,stain] [--baseline-repo PATH] [--cv]
                          [--only-cv] [--reuse]

Synthetic data (thumbclf.inputs.synth, 6 slide types), all made here with fixed seeds:
- a training set; an in-distribution test set; the same test slides as another lab would have
  scanned them (``--shifts``: stain hue and strength, yellowish glass, blur, noise, at each
  strength given);
- the test slides of one slide type (``--holdout``) for models trained without it.

For each variant it trains as a user would (the train/deploy commands; the prototype's
settings: max_epochs 12, lr 1e-4, batch 32, from scratch, full training) and deploys:
1. on the shifted test set, without and with ``adapt_bn``: macro AUROC, accuracy among decided,
   coverage and ECE at the model's own threshold; the same on the unshifted test set;
2. trained without the held-out type, on that type plus the in-distribution test set: the share
   of the unseen type that is Undecided, and coverage / accuracy among decided in distribution;
3. with ``--cv``: 3-fold cross-validation in the prototype's settings: pooled macro AUROC and
   wall time.

Variants: ``main`` runs another checkout's code (``--baseline-repo``, e.g. a worktree of the
commit before these features) with its defaults; ``default`` this checkout's defaults;
``stain`` with ``stain_augment: 0.5``; ``cosine`` with ``lr_schedule: cosine``.
Writes bench/out/trust/ and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from thumbclf.outputs import metrics  # noqa: E402
from thumbclf.inputs import synth
from thumbclf.core.decide import UNDECIDED  # noqa: E402

OUT = ROOT / "bench" / "out" / "trust"
VARIANT_KEYS = {"main": {}, "default": {}, "stain": {"stain_augment": 0.5},
                "cosine": {"lr_schedule": "cosine"}}
REUSE = False
PROTOTYPE = {"max_epochs": 12, "lr": 1e-4, "batch_size": 32, "pretrained": False,
             "stop_epoch": 12, "gradcam": 0, "bootstrap": 0}


def run(repo: Path, script: str, experiment: Path, output: Path, extra: list[str] = ()) -> float:
    """One train/deploy command of ``repo``'s code; its wall time (nan: reused, --reuse)."""
    if REUSE and (output / "report.html").is_file():
        return float("nan")
    if output.exists():  # an unfinished earlier attempt
        shutil.rmtree(output)
    env = dict(os.environ, PYTHONPATH=str(repo))
    start = time.perf_counter()
    r = subprocess.run([sys.executable, str(repo / script), str(experiment), "--output",
                        str(output), *extra], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{script} {experiment} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - start


def experiment(path: Path, keys: dict) -> Path:
    path.write_text("".join(f"{k}: {json.dumps(v) if not isinstance(v, str) else v}\n"
                            for k, v in keys.items()), encoding="utf-8")
    return path


def scores(pred: Path, classes: list[str]) -> dict:
    """Metrics of a labelled deploy from its predictions.csv (labels: the class folders)."""
    df = pd.read_csv(pred, dtype={"model_prediction": str}, keep_default_na=False)
    df["CLASSIFICATION"] = [Path(p).parent.name for p in df["PATH"]]
    m = metrics.compute(df, classes, resamples=0)
    reasons = df.get("undecided_reason", pd.Series([""] * len(df)))
    return {"macro AUROC": m.macro_auroc_ovr, "accuracy (decided)": m.accuracy_decided,
            "coverage": m.coverage, "ECE": m.ece,
            "unfamiliar": float((reasons == "unfamiliar").mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--test-per-class", type=int, default=30)
    ap.add_argument("--shifts", default="1.0,2.0",
                    help="strengths of the other lab's look to deploy on (comma-separated)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the runs a previous bench finished in --out (same settings)")
    ap.add_argument("--holdout", default="TMA", choices=synth.CLASSES)
    ap.add_argument("--max-epochs", type=int, default=PROTOTYPE["max_epochs"])
    ap.add_argument("--variants", default="main,default,stain")
    ap.add_argument("--baseline-repo", type=Path, default=None,
                    help="checkout whose code the 'main' variant runs (required for it)")
    ap.add_argument("--cv", action="store_true", help="also 3-fold CV per variant (slow)")
    ap.add_argument("--only-cv", action="store_true", help="only the cross-validation")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    variants = [v for v in a.variants.split(",") if v]
    if "main" in variants and a.baseline_repo is None:
        ap.error("the 'main' variant needs --baseline-repo (a checkout of the code to compare)")
    global REUSE
    REUSE = a.reuse
    out = a.out
    if out.exists() and not a.reuse:
        shutil.rmtree(out)
    data = out / "data"
    sides = dict(sides=(200, 500))
    a.tests = ["test"] + [f"shifted-{float(x):g}" for x in a.shifts.split(",") if x]
    sets = {"train": dict(per_class=a.per_class, seed=1),
            "test": dict(per_class=a.test_per_class, seed=2),
            "unseen": dict(per_class=a.test_per_class, seed=2, classes=(a.holdout,)),
            **{t: dict(per_class=a.test_per_class, seed=2, shift=float(t.split("-")[1]))
               for t in a.tests[1:]}}
    for name, how in sets.items():
        if not (data / name / "labels.csv").is_file():
            synth.generate(data / name, **how, **sides)
    known = [c for c in synth.CLASSES if c != a.holdout]
    classes = list(synth.CLASSES)
    rows, open_rows, cv_rows = [], [], []
    for v in variants:
        repo = a.baseline_repo.resolve() if v == "main" else ROOT
        keys = {**PROTOTYPE, "max_epochs": a.max_epochs, **VARIANT_KEYS[v]}
        vdir = out / v
        vdir.mkdir(parents=True, exist_ok=True)
        if a.only_cv:
            a.cv = True
        else:
            deploy_scenarios(a, v, repo, keys, vdir, data, classes, known, rows, open_rows)
        # 3. cross-validation in the prototype's settings
        if a.cv:
            secs = run(repo, "train_thumbclassifier.py", experiment(vdir / "cv.yaml", {
                "thumb_data": str(data / "train" / "labels.csv"), "fold_number": 3, **keys}),
                vdir / "cv")
            m = json.loads((vdir / "cv" / "metrics.json").read_text())["all"]
            cv_rows.append({"variant": v, "pooled macro AUROC": m["macro_auroc_ovr"],
                            "wall time (s)": round(secs)})
            print(cv_rows[-1], flush=True)
    print(f"\n{a.per_class} training and {a.test_per_class} test slides per class, shifts "
          f"{a.shifts}, {a.max_epochs} epochs, from scratch\n")
    for table in (rows, open_rows, cv_rows):
        if table:
            print(pd.DataFrame(table).to_markdown(index=False, floatfmt=".3f"), "\n")
    for name, table in (("shift", rows), ("unseen", open_rows), ("cv", cv_rows)):
        if table:
            pd.DataFrame(table).to_csv(out / f"{name}.csv", index=False)


def deploy_scenarios(a, v, repo, keys, vdir, data, classes, known, rows, open_rows) -> None:
    """Scenarios 1 (another lab) and 2 (an unseen slide type) of one variant."""
    # 1. train on unshifted slides; deploy on unshifted and shifted, with/without adaptation
    secs = run(repo, "train_thumbclassifier.py", experiment(vdir / "train.yaml", {
        "thumb_data": str(data / "train" / "labels.csv"), "train_full": True, **keys}),
        vdir / "train")
    print(f"{v}: trained in {secs:.0f}s", flush=True)
    for test in a.tests:
        for adapt in ((False, True) if v != "main" else (False,)):
            name = f"{test}{'-adapt' if adapt else ''}"
            dep = {"thumb_data": str(data / test), "model_path": str(vdir / "train"),
                   "gradcam": 0, "bootstrap": 0, "engine": "torch"}
            if adapt:
                dep["adapt_bn"] = True
            run(repo, "deploy_thumbclassifier.py", experiment(vdir / f"{name}.yaml", dep),
                vdir / name)
            rows.append({"variant": v, "deploy on": name,
                         **scores(vdir / name / "predictions.csv", classes)})
            print(rows[-1], flush=True)
    # 2. an unseen slide type
    run(repo, "train_thumbclassifier.py", experiment(vdir / "train_known.yaml", {
        "thumb_data": str(data / "train" / "labels.csv"), "train_full": True,
        "target_labels": known, **keys}), vdir / "train_known")
    for test in ("unseen", "test"):
        dep = {"thumb_data": str(data / test), "model_path": str(vdir / "train_known"),
               "gradcam": 0, "bootstrap": 0, "engine": "torch", "has_labels": False}
        run(repo, "deploy_thumbclassifier.py",
            experiment(vdir / f"known-{test}.yaml", dep), vdir / f"known-{test}")
    unseen = pd.read_csv(vdir / "known-unseen" / "predictions.csv", keep_default_na=False)
    indist = pd.read_csv(vdir / "known-test" / "predictions.csv", keep_default_na=False)
    indist = indist[[Path(p).parent.name in known for p in indist["PATH"]]]
    decided = indist[indist["model_prediction"] != UNDECIDED]
    open_rows.append({
        "variant": v, f"{a.holdout} (unseen) Undecided": float(
            (unseen["model_prediction"] == UNDECIDED).mean()),
        "in-distribution coverage": len(decided) / max(len(indist), 1),
        "in-distribution accuracy (decided)": float(
            (decided["model_prediction"] == [Path(p).parent.name for p in decided["PATH"]]
             ).mean()) if len(decided) else float("nan")})
    print(open_rows[-1], flush=True)


if __name__ == "__main__":
    main()
