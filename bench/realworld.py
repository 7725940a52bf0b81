#!/usr/bin/env python3
"""Does "Undecided" hold on real slides? A model trained on synthetic slides, deployed on real
slide thumbnails of public sources (../shared/realdata), beside the synthetic lab shift and
unseen-type figures of bench/trust.py, in one table.

    python bench/realworld.py [--per-class 50] [--max-epochs 12] [--variants default,stain]
                              [--seeds 1,2,3] [--shifts 1.0,1.5,2.0] [--reuse] [--out DIR]

Skips (exit 0, saying so) where ../shared/realdata is absent. Trains as a user would (the
prototype's settings: full training, 12 epochs, lr 1e-4, batch 32, from scratch) on the 6
synthetic slide types, once per variant (``default``: this checkout's defaults; ``stain``:
``stain_augment: 0.5``), plus once without TMA for the unseen type, once per training seed
(``--seeds``: one trained model's figures vary from seed to seed), and deploys with defaults:

- on the real thumbnails (``realdata/public`` with its labels and SOURCE, plus the labelled
  ones of ``realdata/thumbnails``), unlabelled, with and without ``adapt_bn``: how many are
  decided, why the others are Undecided, and accuracy among decided where the real label is one
  of the model's classes (Tumor counts as Resection; Healthy, which the model lacks, as wrong
  whenever decided; Other = not a slide type, must be Undecided; Unknown: left out);
- the margins of the unfamiliar rule's parts (content, look) and the source rule's
  ``unfamiliar_share`` (1 = off), decided again from the same predictions (each part scaled by
  its default margin / the margin tried), to show what each trades;
- on the synthetic test set and the same slides as other labs would scan them (shifts), with
  and without ``adapt_bn``; on an archive of one slide type (60 Resection slides, with and
  without ``adapt_bn``, which assumes a mix of types); and a type never trained on (TMA) mixed
  into the test slides of the other types, as an archive would hold it (one deploy).

Writes bench/out/realworld/ (the deploys' reports hold the galleries of each reason) and prints
Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import trust  # noqa: E402  (bench/trust.py: its runner, experiment writer and scores)
from thumbclf.core import table  # noqa: E402
from thumbclf.core.decide import (REASONS, UNDECIDED, UNFAMILIAR_SOURCE,  # noqa: E402
                                  decide_with_reasons, unfamiliar_sources)
from thumbclf.inputs import synth  # noqa: E402
from thumbclf.nn import familiarity  # noqa: E402

REALDATA = ROOT.parent / "shared" / "realdata"
OUT = ROOT / "bench" / "out" / "realworld"
TO_MODEL = {"Tumor": "Resection"}  # a real label -> the synthetic class of the same type
KNOWN = ("Tumor", "Healthy", "IHC", "TMA", "Biopsy", "Fat", "LymphNode")
# thumbnails/ has no labels file; its README names these by eye
THUMBNAIL_LABELS = {"histoqc_coverslip_edge_ihc.png": "IHC", "cima_mouse-lung_ihc-ki67.jpg": "IHC",
                    "cima_mouse-lung_ihc-cd31.jpg": "IHC"}
DEFAULT = (familiarity.MARGIN, familiarity.LOOK_MARGIN)  # the rule's margins: content, look
MARGINS = ((1.5, 1.5), (1.0, 1.5), (1.5, 3.0), (1.0, 2.0), (1.5, 4.5))  # the same, tried
ONE_TYPE = "one-type"  # 60 Resection slides: an archive of one slide type, for adapt_bn


def real_table(out: Path) -> Path:
    """The real thumbnails as one table: PATH, SOURCE (the repository), and REAL_LABEL."""
    public = pd.read_csv(REALDATA / "public" / "labels.csv", dtype=str, keep_default_na=False)
    rows = [{"PATH": str(REALDATA / "public" / r.PATH), "SOURCE": r.SOURCE.split()[0],
             "REAL_LABEL": r.CLASSIFICATION} for r in public.itertuples()]
    for p in sorted((REALDATA / "thumbnails").iterdir()):
        rows.append({"PATH": str(p), "SOURCE": p.name.split("_")[0],
                     "REAL_LABEL": THUMBNAIL_LABELS.get(p.name, "Unknown")})
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "real-inputs.csv", index=False)
    return out / "real-inputs.csv"


def real_scores(pred: pd.DataFrame, labels: pd.DataFrame, margins: tuple[float, float] = DEFAULT,
                share: float = 0.5) -> dict:
    """What a deploy on the real thumbnails decided, with the rule's ``margins`` (content,
    look) and the source rule's ``share`` (decided again from the table's columns, as thumbclf
    decides)."""
    df = pred.merge(labels[["PATH", "REAL_LABEL"]], on="PATH")
    classes = [c for c in synth.CLASSES if c in df.columns]
    parts = [table.signal(df, c) * d / m for c, d, m in zip(
        (table.UNFAMILIAR_CONTENT, table.UNFAMILIAR_LOOK), DEFAULT, margins)
        if table.signal(df, c) is not None]
    decisions, reasons = decide_with_reasons(
        df[classes].to_numpy(float), classes, float(df[table.THRESHOLD].iloc[0]),
        np.max(parts, axis=0) if parts else None, table.signal(df, table.TISSUE))
    decisions, reasons, _ = unfamiliar_sources(
        decisions, reasons, np.max(parts, axis=0) if parts else None,
        df[table.SOURCE].tolist() if table.SOURCE in df else None, share)
    decisions, reasons = np.array(decisions), np.array(reasons)
    decided = decisions != UNDECIDED
    real = df["REAL_LABEL"].to_numpy()
    known = np.isin(real, KNOWN)
    right = decisions == np.array([TO_MODEL.get(r, r) for r in real])
    dk = decided & known
    return {"slides": len(df), "decided": int(decided.sum()),
            "known-type slides decided": f"{int(dk.sum())} of {int(known.sum())}",
            "accuracy (decided, known types)": float(right[dk].mean()) if dk.any() else None,
            "Other Undecided": f"{int((~decided & (real == 'Other')).sum())} of "
                               f"{int((real == 'Other').sum())}",
            **{r: int((reasons == r).sum()) for r in REASONS}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--test-per-class", type=int, default=30)
    ap.add_argument("--max-epochs", type=int, default=trust.PROTOTYPE["max_epochs"])
    ap.add_argument("--variants", default="default,stain")
    ap.add_argument("--seeds", default="1", help="training seeds (comma-separated): the "
                    "figures of one trained model vary from seed to seed; 1 is the default")
    ap.add_argument("--shifts", default="1.0,1.5,2.0")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs in --out")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    if not (REALDATA / "public" / "labels.csv").is_file():
        print(f"skipped: {REALDATA} is absent (real slide thumbnails)")
        return
    trust.REUSE = a.reuse
    if a.out.exists() and not a.reuse:
        shutil.rmtree(a.out)
    _same_margins(a.out)
    data, sides = a.out / "data", dict(sides=(200, 500))
    a.tests = ["test"] + [f"shifted-{float(x):g}" for x in a.shifts.split(",") if x]
    sets = {"train": dict(per_class=a.per_class, seed=1),
            "test": dict(per_class=a.test_per_class, seed=2),
            "unseen": dict(per_class=a.test_per_class, seed=2, classes=("TMA",)),
            ONE_TYPE: dict(per_class=2 * a.test_per_class, seed=5, classes=("Resection",)),
            **{t: dict(per_class=a.test_per_class, seed=2, shift=float(t.split("-")[1]))
               for t in a.tests[1:]}}
    for name, how in sets.items():
        if not (data / name / "labels.csv").is_file():
            synth.generate(data / name, **how, **sides)
    labels_csv = real_table(a.out)
    rows: dict[str, list[dict]] = {"real": [], "synthetic": [], "unseen": []}
    for v in [v for v in a.variants.split(",") if v]:
        for seed in [int(s) for s in a.seeds.split(",") if s]:
            vdir = a.out / (v if seed == 1 else f"{v}-seed{seed}")
            _variant(a, v, seed, vdir, data, labels_csv, rows)
            if v == "default":
                _unseen(a, data, seed, vdir, rows["unseen"])
    for name, found in rows.items():
        if found:
            frame = pd.DataFrame(found)
            frame.to_csv(a.out / f"results-{name}.csv", index=False)
            print(f"\n{name}\n\n" + frame.to_markdown(index=False, floatfmt=".3f"), flush=True)
    if rows["synthetic"]:
        print("\nsynthetic, accuracy among decided at coverage, per seed\n\n"
              + by_seed(pd.DataFrame(rows["synthetic"])).to_markdown(), flush=True)


def _same_margins(out: Path) -> None:
    """Refuse to reuse deploys made with other margins: the tables store each part's
    unfamiliarity at the margins of the code that deployed, and real_scores rescales them
    from this code's (DEFAULT)."""
    record, now = out / "margins.json", json.dumps(DEFAULT)
    if record.is_file() and record.read_text() != now:
        sys.exit(f"{out} holds deploys made with margins {record.read_text()}, this code's are "
                 f"{now}: use another --out, or keep only the trainings (train, train_known)")
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(now)


def by_seed(frame: pd.DataFrame) -> pd.DataFrame:
    """'accuracy @ coverage' of each deploy (rows) for each seed (columns)."""
    cell = [f"{acc:.3f} @ {cov:.3f}" if acc == acc and acc is not None else f"– @ {cov:.3f}"
            for acc, cov in zip(frame["accuracy (decided)"], frame["coverage"])]
    return (frame.assign(cell=cell).pivot_table(index=["variant", "deploy on"], columns="seed",
                                                values="cell", aggfunc="first", sort=False))


def _variant(a, v: str, seed: int, vdir: Path, data: Path, labels_csv: Path,
             rows: dict[str, list[dict]]) -> None:
    """Train variant ``v`` with ``seed``; deploy it on the real thumbnails (with and without
    adapt_bn), on the synthetic test slides as each lab would scan them (with and without
    adapt_bn), and on an archive of one slide type (adapt_bn assumes a mix of types)."""
    labels = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    keys = {**trust.PROTOTYPE, "max_epochs": a.max_epochs, "seed": seed, **trust.VARIANT_KEYS[v]}
    vdir.mkdir(parents=True, exist_ok=True)
    secs = trust.run(ROOT, "train_thumbclassifier.py", trust.experiment(
        vdir / "train.yaml", {"thumb_data": str(data / "train" / "labels.csv"),
                              "train_full": True, **keys}), vdir / "train")
    print(f"{v}, seed {seed}: trained in {secs:.0f}s", flush=True)
    for adapt in (False, True):
        name = f"real{'-adapt' if adapt else ''}"
        dep = {"thumb_data": str(labels_csv), "model_path": str(vdir / "train"),
               "has_labels": False, "bootstrap": 0, "engine": "torch", "adapt_bn": adapt}
        trust.run(ROOT, "deploy_thumbclassifier.py",
                  trust.experiment(vdir / f"{name}.yaml", dep), vdir / name)
        pred = pd.read_csv(vdir / name / "predictions.csv", keep_default_na=False)
        settings = [(DEFAULT, 0.5), (DEFAULT, 1.0)] + [(m, 0.5) for m in MARGINS]
        for margins, share in (settings if not adapt else settings[:2]):
            rows["real"].append({"variant": v + (" + adapt_bn" if adapt else ""), "seed": seed,
                                 "margins (content / look)": "%g / %g" % margins,
                                 "unfamiliar_share": share,
                                 **real_scores(pred, labels, margins, share)})
            print(rows["real"][-1], flush=True)
    for test in a.tests + [ONE_TYPE]:
        for adapt in (False, True):
            name = f"{test}{'-adapt' if adapt else ''}"
            dep = {"thumb_data": str(data / test), "model_path": str(vdir / "train"),
                   "gradcam": 0, "bootstrap": 0, "engine": "torch", "adapt_bn": adapt}
            trust.run(ROOT, "deploy_thumbclassifier.py",
                      trust.experiment(vdir / f"{name}.yaml", dep), vdir / name)
            reasons = pd.read_csv(vdir / name / "predictions.csv", keep_default_na=False)
            rows["synthetic"].append({"variant": v, "seed": seed, "deploy on": name,
                                      **trust.scores(vdir / name / "predictions.csv",
                                                     list(synth.CLASSES)),
                                      "unfamiliar source": float(
                                          (reasons[table.REASON] == UNFAMILIAR_SOURCE).mean())})
            print(rows["synthetic"][-1], flush=True)


def _unseen(a, data: Path, seed: int, vdir: Path, rows: list[dict]) -> None:
    """The default model trained without TMA, deployed on an archive of the 150 test slides of
    the other types with the 30 TMA slides mixed in (one deploy, as an archive would hold them),
    with and without adapt_bn."""
    known = [c for c in synth.CLASSES if c != "TMA"]
    keys = {**trust.PROTOTYPE, "max_epochs": a.max_epochs, "seed": seed}
    trust.run(ROOT, "train_thumbclassifier.py", trust.experiment(vdir / "train_known.yaml", {
        "thumb_data": str(data / "train" / "labels.csv"), "train_full": True,
        "target_labels": known, **keys}), vdir / "train_known")
    paths = [p for name in ("test", "unseen") for p in sorted((data / name).rglob("*.jpg"))
             if name == "unseen" or p.parent.name in known]
    pd.DataFrame({"PATH": [str(p) for p in paths]}).to_csv(vdir / "mixed.csv", index=False)
    for adapt in (False, True):
        name = f"known-mixed{'-adapt' if adapt else ''}"
        dep = {"thumb_data": str(vdir / "mixed.csv"), "model_path": str(vdir / "train_known"),
               "gradcam": 0, "bootstrap": 0, "engine": "torch", "has_labels": False,
               "adapt_bn": adapt}
        trust.run(ROOT, "deploy_thumbclassifier.py", trust.experiment(vdir / f"{name}.yaml", dep),
                  vdir / name)
        df = pd.read_csv(vdir / name / "predictions.csv", keep_default_na=False)
        truth = np.array([Path(p).parent.name for p in df["PATH"]])
        undecided = (df[table.DECISION] == UNDECIDED).to_numpy()
        indist = truth != "TMA"
        decided = indist & ~undecided
        rows.append({"variant": "default" + (" + adapt_bn" if adapt else ""), "seed": seed,
                     "TMA (unseen) Undecided": float(undecided[~indist].mean()),
                     "in-distribution coverage": float(decided.sum() / max(indist.sum(), 1)),
                     "in-distribution accuracy (decided)": float(
                         (df[table.DECISION].to_numpy()[decided] == truth[decided]).mean())
                     if decided.any() else float("nan"),
                     "Undecided: unfamiliar source": int(
                         (df[table.REASON] == UNFAMILIAR_SOURCE).sum())})
        print(rows[-1], flush=True)


if __name__ == "__main__":
    main()
