#!/usr/bin/env python3
"""Deployment and training speed against the model's own limit, measured in the same run.

    python bench/inference.py [--images 1200] [--train-images 280] [--epochs 3] [--workers 1,-1]
                              [--combos] [--memory 10000] [--small] [--model FILE]
                              [--rule-cost ROUNDS] [--allocator ROUNDS]

1. PyTorch fp32's model-only limits (resnet18, batch 64, channels_last, random tensors in memory):
   inference, and a training step (freezeRatio 0.5).
2. Training: a trainFull run of ``--epochs`` on ``--train-images`` thumbnails; its pace is the
   training images seen (epochs x images) per second of the run after decoding, as a ratio to the
   model-only training limit.
3. Deployment with default settings (engine and precision auto: the quality gate decides, on a
   seeded sample of the deploy's own images and the model's validation split), end to end from
   files (decoding in workers, inference, writing rows), on a JPEG-only and a PNG-only folder of
   realistic 800-1500 px thumbnails, as a ratio to the fp32 inference limit; the first deploy
   converts the model and runs the gate (both cached), the second is timed as a user's later
   deploys are. Also a plain PyTorch fp32 deploy (precision fp32), and with ``--combos`` each
   engine/precision forced. ``--workers``: decoding workers (-1: the default, cores - 1).
   ``--small``: the deploys on small thumbnails (200-500 px long side; the model is still
   trained on the large ones). ``--memory N``: the peak memory of a deploy of N images (hard links to the same files).
   Beside each ratio (issue 29): the decoder's own time per file on one core (the files decoded
   in this process, one after another), the pipeline limit it implies together with fp32's
   model-only limit on C cores, C / (decode seconds per file + C / model-only images per
   second), the deploy's ratio to that limit, and the share of images the band recomputed in
   fp32 (exact reduced precision: gate.py).
``--rule-cost N`` (issue 28): the unfamiliar rule's cost, the default deploy of the model against
   the same model file without the rule (older model files: confidence only), N rounds each,
   alternating, caches warmed first; the median rates and their ratio.
``--allocator N``: the same for the memory a run keeps between batches (core/machine.py:
   keep_freed_memory), against glibc's default malloc behaviour; with the peak memory of each.
The model-only limits are measured as a run computes, with freed memory kept.
Not a test: figures depend on the machine; on a shared machine only the ratios count.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402

from thumbclf.core import machine  # noqa: E402
from thumbclf.predict import inference  # noqa: E402

COMBOS = [("torch", "fp32"), ("torch", "bf16"), ("openvino", "fp32"), ("openvino", "bf16"),
          ("openvino", "int8")]


def decode_seconds(folder: Path, model: Path, n: int = 60) -> float:
    """The decoder's own time per file, on one core: ``n`` files of ``folder`` decoded one after
    another in this process, as a deploy's workers decode them (the model's preprocessing)."""
    import torch

    from thumbclf.inputs.decode import load_array
    from thumbclf.nn.models import load_model

    prep = load_model(model).prep
    files = sorted(folder.iterdir())[:n]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t = time.perf_counter()
    for f in files:
        load_array(f, prep)
    torch.set_num_threads(threads)
    return (time.perf_counter() - t) / max(1, len(files))


def pipeline_limit(decode_s: float, model_limit: float, cores: int) -> float:
    """Images/s that decoding and the model allow together when they share ``cores`` cores."""
    return cores / (decode_s + cores / model_limit)


def recomputed(note: str) -> str:
    """The share the band recomputed in fp32, as the deploy's inference note states it."""
    import re

    found = re.search(r"\(([\d.]+%)\) recomputed in fp32", note)
    return found.group(1) if found else "none (fp32)"


def agreement(a: dict, b: dict) -> str:
    """How two deploys of the same images compare: decisions (and reasons) equal on how many
    rows, and the largest difference of a probability."""
    import numpy as np

    from thumbclf.core import table as table_io

    ta, classes = table_io.read(a["folder"] / "predictions.csv")
    tb, _ = table_io.read(b["folder"] / "predictions.csv", classes)
    ta, tb = ta.sort_values(table_io.PATH), tb.sort_values(table_io.PATH)
    same = int((ta[table_io.DECISION].to_numpy() == tb[table_io.DECISION].to_numpy()).sum())
    diff = float(np.abs(ta[classes].to_numpy() - tb[classes].to_numpy()).max())
    return f"decisions equal on {same} of {len(ta)} images, probabilities within {diff:.1e}"


def deploy(folder: Path, model: Path, tag: str, workers: int, env: dict | None = None,
           **keys) -> dict:
    """One deploy in its own process (``env``: added to its environment); images/s of its
    prediction step (gate included)."""
    d = B.thumbclf_deploy(folder, model, 64, "cpu", tag, extra={"num_workers": workers, **keys},
                          env=env)
    d["rate"] = d["images"] / d["predict_s"]
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1200, help="JPEG and PNG thumbnails each")
    ap.add_argument("--train-images", type=int, default=280)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", default="-1", help="decoding workers to try, comma-separated")
    ap.add_argument("--combos", action="store_true", help="also each engine/precision forced")
    ap.add_argument("--memory", type=int, default=0, help="images of a deploy whose memory is shown")
    ap.add_argument("--small", action="store_true",
                    help="deploy small thumbnails (200-500 px long side) instead of 800-1500 px")
    ap.add_argument("--model", type=Path, help="deploy this model file (skips training, part 2)")
    ap.add_argument("--rule-cost", type=int, default=0, metavar="ROUNDS",
                    help="only the unfamiliar rule's cost: ROUNDS deploys with and without it")
    ap.add_argument("--allocator", type=int, default=0, metavar="ROUNDS",
                    help="only the memory kept between batches: ROUNDS deploys with and "
                         "without it (glibc's defaults)")
    args = ap.parse_args()
    B.OUT.mkdir(parents=True, exist_ok=True)
    machine.keep_freed_memory()  # the limits as a run computes (thumbclf's runs keep it)
    import torch

    torch.set_num_threads(B.cores())
    cpu = torch.device("cpu")
    table = B.make_data(args.train_images)
    train_limit, limit = B.model_only(cpu, 64, 0.5, 4)
    print(f"1. model only (PyTorch fp32, resnet18, batch 64, {B.cores()} threads): inference "
          f"{limit:.1f} img/s, training step {train_limit:.1f} img/s; native bf16 "
          f"{inference.native('bf16', cpu)}, int8 {inference.native('int8', cpu)}; OpenVINO "
          f"{inference.openvino_version() or 'not installed'}")

    if args.model is None:
        model = train(table, args, train_limit)
    else:
        model = args.model.resolve()
    if args.rule_cost:
        rule_cost(table, model, args)
        return
    if args.allocator:
        allocator_cost(table, model, args)
        return
    deploys(table, model, args, limit)


def rule_cost(table: Path, model: Path, args) -> None:
    """The default deploy with and without the unfamiliar rule, alternating (issue 28: the rule
    may cost at most 5% of the throughput)."""
    from dataclasses import replace

    from thumbclf.nn.models import load_model, save_model

    bare = B.OUT / "model-without-rule.pt"
    save_model(bare, replace(load_model(model), familiarity=None))
    alternate(table, args, "the unfamiliar rule's cost", "rule", args.rule_cost,
              {"with": (model, {}), "without": (bare, {})})


# glibc's own malloc behaviour: a setting of the user's, which thumbclf leaves as it is
# (core/machine.user_set_malloc); this tunable is glibc's default value
GLIBC_DEFAULTS = {"GLIBC_TUNABLES": "glibc.malloc.check=0"}


def allocator_cost(table: Path, model: Path, args) -> None:
    """The default deploy as thumbclf runs it (freed memory kept for the next batch,
    core/machine.keep_freed_memory) and with glibc's default malloc behaviour, alternating."""
    alternate(table, args, "memory kept between batches", "malloc", args.allocator,
              {"with": (model, {}), "without": (model, GLIBC_DEFAULTS)})


def alternate(table: Path, args, what: str, tag: str, rounds: int,
              variants: dict[str, tuple[Path, dict]]) -> None:
    """Default deploys of each variant (name: model file, environment), ``rounds`` rounds,
    alternating, caches warmed first; the median rates, and the first variant against the
    second."""
    import statistics

    size = "-small" if args.small else ""
    if args.small:
        table = B.make_data(args.train_images, B.SMALL)
    print(f"\n3. {what}: default deploys of {args.images} images, "
          f"{' and '.join(variants)}, {rounds} rounds, alternating")
    first, second = list(variants)
    for kind in ("jpg", "png"):
        folder = B.many_links(table, args.images, suffix=f".{kind}")
        rates: dict[str, list[float]] = {name: [] for name in variants}
        cache = {name: B.OUT / f"cache-{tag}-{name}-{kind}{size}" for name in variants}

        def run(name: str) -> dict:
            model, env = variants[name]
            return deploy(folder, model, f"{tag}-{name}-{kind}{size}", -1, env=env,
                          cache_dir=str(cache[name]))

        for name in variants:  # warm: the conversion and the gate are cached
            shutil.rmtree(cache[name], ignore_errors=True)
            run(name)
        memory: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(rounds):
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                d = run(name)
                rates[name].append(d["rate"])
                memory[name].append(d["peak_rss_mb"])
        med = {name: statistics.median(v) for name, v in rates.items()}
        print(f"   {kind.upper()}{size}: {first} {med[first]:.1f} img/s, {second} "
              f"{med[second]:.1f} (median of {rounds}; each: "
              + "; ".join(f"{n} {', '.join(f'{x:.1f}' for x in v)}" for n, v in rates.items())
              + f"): {first} against {second} {med[first] / med[second] - 1:+.1%}; peak memory "
              + ", ".join(f"{n} {max(v):.0f} MB" for n, v in memory.items()))
        print(json.dumps({"kind": kind + size, **{f"{tag}_{n}": v for n, v in rates.items()},
                          **{f"peak_mb_{n}": v for n, v in memory.items()}}))


def train(table: Path, args, train_limit: float) -> Path:
    tr = B.thumbclf_train(table, args.epochs, 64, 0.5, "cpu")
    timings = json.loads((tr["model"].parent / "timings.json").read_text())
    h = tr["history"]
    seen = args.epochs * round(tr["n_images"] * 0.9)  # trainFull: 10% validation
    after_decode = timings["total_seconds"] - timings["decode_seconds"]
    pace = seen / after_decode
    print(f"\n2. training (trainFull, {args.epochs} epochs, {tr['n_images']} thumbnails): "
          f"{pace:.1f} img/s after decoding = {pace / train_limit:.2f}x the training limit; "
          f"epochs {h['seconds'].sum():.1f}s of {after_decode:.1f}s (decoding "
          f"{timings['decode_seconds']:.1f}s)")
    print(json.dumps({"train_limit": train_limit, "train_pace": pace / train_limit}))
    return tr["model"]


def deploys(table: Path, model: Path, args, limit: float) -> None:
    """Part 3: on a shared machine the limit is measured again around each kind's deploys."""
    import torch

    size = "-small" if args.small else ""
    if args.small:
        table = B.make_data(args.train_images, B.SMALL)
    folders = {kind: B.many_links(table, args.images, suffix=f".{kind}") for kind in ("jpg", "png")}
    print(f"\n3. deploy, {args.images} images each, ratio to the fp32 inference limit measured "
          "just before and after (their mean)")
    for w in [int(v) for v in args.workers.split(",")]:
        for kind, folder in folders.items():
            cache = B.OUT / f"cache-{kind}{size}-w{w}"  # new: the first deploy converts and verifies
            shutil.rmtree(cache, ignore_errors=True)
            before = B.model_only(torch.device("cpu"), 64, 0.5, 3)[1]
            first = deploy(folder, model, f"auto-{kind}{size}-w{w}-first", w, cache_dir=str(cache))
            again = deploy(folder, model, f"auto-{kind}{size}-w{w}", w, cache_dir=str(cache))
            plain = deploy(folder, model, f"fp32-{kind}{size}-w{w}", w, precision="fp32",
                           cache_dir=str(cache))
            after = B.model_only(torch.device("cpu"), 64, 0.5, 3)[1]
            lim = (before + after) / 2
            dec = decode_seconds(folder, model)
            pipe = pipeline_limit(dec, lim, B.cores())
            print(f"   {kind.upper()} workers {again['workers']} (limit {before:.1f} then "
                  f"{after:.1f} img/s): defaults {again['rate']:.1f} img/s = "
                  f"{again['rate'] / lim:.2f}x (first deploy, gate and conversion included: "
                  f"{first['rate'] / lim:.2f}x); plain fp32 {plain['rate']:.1f} img/s = "
                  f"{plain['rate'] / lim:.2f}x\n      decoding {1 / dec:.1f} files/s on one "
                  f"core and the model {lim:.1f} img/s imply a pipeline limit of {pipe:.1f} "
                  f"img/s on {B.cores()} cores: defaults {again['rate'] / pipe:.2f} of it "
                  f"(recomputed in fp32: {recomputed(again['inference'])}), plain fp32 "
                  f"{plain['rate'] / pipe:.2f} of it\n      engine: {again['inference']}\n"
                  f"      against the plain fp32 deploy: {agreement(again, plain)}")
            print(json.dumps({"kind": kind + size, "decode_s_per_file": dec, "model_limit": lim,
                              "pipeline_limit": pipe, "defaults": again["rate"],
                              "fp32": plain["rate"],
                              "recomputed": recomputed(again["inference"])}))
    if args.combos:
        for engine, precision in COMBOS:
            if engine == "openvino" and inference.openvino_version() is None:
                continue
            if not inference.native(precision, torch.device("cpu")):
                print(f"   {engine} {precision}: not native on this CPU: skipped")
                continue
            cells = []
            for kind, folder in folders.items():
                try:
                    d = deploy(folder, model, f"{engine}-{precision}-{kind}", -1, engine=engine,
                               precision=precision)
                    cells.append(f"{kind.upper()} {d['rate'] / limit:.2f}x")
                except SystemExit as exc:
                    cells.append(f"{kind.upper()} refused ({exc})")
            print(f"   {engine} {precision} forced: {', '.join(cells)}")
    if args.memory:
        t = time.perf_counter()
        d = deploy(B.many_links(table, args.memory), model, f"mem{args.memory}", -1)
        print(f"\n4. a deploy of {args.memory} images: peak memory {d['peak_rss_mb']:.0f} MB "
              f"(main process), {d['rate']:.1f} img/s ({time.perf_counter() - t:.0f}s)")
    print(json.dumps({"inference_limit": limit}))


if __name__ == "__main__":
    main()
