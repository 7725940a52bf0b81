"""The inference engine of a deploy: each model's verified engine and precision (engine,
precision keys), checked on the first images of the deploy's own stream (decoded once: the
stream computes them) and on labelled images."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from thumbclf.inputs import splits as splitting
from thumbclf.inputs.samples import discover
from thumbclf.nn.data import stream_loader, to_input
from thumbclf.nn.models import LoadedModel
from thumbclf.predict import gate, inference
from thumbclf.predict.ensemble import exact_runners
from thumbclf.predict.executor import InferenceSpec
from thumbclf.predict.local import decode_workers

log = logging.getLogger(__name__)
CALIBRATION_IMAGES = 256  # int8: the deploy's own first images calibrate the quantisation


class Head:
    """The first images of a deploy's stream, its verification images (issue 29): their paths
    are known at once; their pixels (``readable()``: paths and uint8 batch of the readable
    ones) are taken from the stream only when a verdict or an int8 calibration needs them. A
    deploy whose verdict is cached takes none, so its stream computes from the first batch
    while the engine loads, and a Ray deploy decodes nothing on the driver."""

    def __init__(self, paths: list[Path], take: Callable[[], list[tuple[list[Path], torch.Tensor]]]):
        self.paths, self._take, self._readable = paths, take, None

    def readable(self) -> list[tuple[list[Path], torch.Tensor]]:
        if self._readable is None:
            self._readable = self._take()
        return self._readable


NO_HEAD = Head([], list)  # no deploy images to verify on (load_model() has none)


def prepare_runners(models: list[LoadedModel], spec: InferenceSpec, head: Head | None,
                    device: torch.device, threshold: float) -> tuple[list[inference.Runner], str]:
    """The inference engine and precision of each model (engine, precision keys), verified;
    ``head``: the first images of the deploy's stream, its verification images (None: no
    deploy images, as load_model() has); a deploy smaller than the verification sample
    computes PyTorch fp32, which verifying would compute anyway. ``spec.progress``: show the
    int8 quantisation's progress bars."""
    first = models[0]
    why = fp32_suffices(len(head.paths), spec) if head is not None else None
    if why:
        log.info("inference: %s", why)
        return exact_runners(models, device), why
    head = head or NO_HEAD
    evidence = gate_evidence(models, spec, head)

    def calibration():  # int8: unlabelled deploy images, as the model will see them
        seen = 0
        for _, b in head.readable():
            if seen >= CALIBRATION_IMAGES:
                break
            seen += len(b)
            yield to_input(b, first.norm, torch.device("cpu"), channels_last=False)

    engine = inference.EngineSpec(engine=spec.engine, precision=spec.precision,
                                  cache_dir=spec.cache_dir, device=device,
                                  progress=spec.progress)
    runners, notes = [], []
    for m in models:
        model = inference.ModelSpec(
            m.runnable(), m.path, m.prep.size, m.classes, threshold, m.temperature,
            channels_last=not m.legacy, familiarity=m.familiarity)
        runner, why = inference.choose(model, engine, lambda: evidence, calibration)
        runners.append(runner)
        notes.append(why)
    inference.ensemble_band(runners, threshold)
    why = notes[0] if len(set(notes)) == 1 else "; ".join(
        f"{m.path.name}: {n}" for m, n in zip(models, notes))
    log.info("inference: %s", why)
    return runners, why


def fp32_suffices(images: int, spec: InferenceSpec) -> str | None:
    """Why PyTorch fp32 computes a deploy of ``images`` images without verifying anything (too
    few to verify a faster precision on, which would compute them in fp32 anyway), or None."""
    if images >= gate.AGREEMENT_IMAGES or spec.precision != "auto":
        return None
    return (f"PyTorch fp32 ({images} images: fewer than the {gate.AGREEMENT_IMAGES} a faster "
            "precision is verified on, so fp32 costs nothing extra)")


def gate_evidence(models: list[LoadedModel], spec: InferenceSpec,
                  head: Head) -> inference.Evidence:
    """The quality gate's images: up to gate.AGREEMENT_IMAGES of the deploy's own, the first of
    its stream (``head``, taken from the stream only if a verdict is needed: the stream computes
    them; with their labels where they are verification images too), then the other labelled verification images
    (verification_pairs), decoded in the decoding workers only if a verdict is needed. The verdict's key names the labelled images only: a second deploy of the same
    model, on other images, verifies nothing again (its band still widens where its own
    recomputed images differ more)."""
    first = models[0]
    pairs = verification_pairs(models, spec)
    key = hashlib.sha1(("stream|" + "\n".join(f"{p}|{lab}" for p, lab in pairs)
                        ).encode("utf-8", "surrogateescape")).hexdigest()
    known = {path: first.classes.index(lab) for path, lab in pairs}
    first_paths = set(head.paths)
    planned = len(first_paths) + sum(path not in first_paths for path, _ in pairs)

    def decode():
        readable = head.readable()
        head_labels = np.array([known.get(p, -1) for ps, _ in readable for p in ps], dtype=int)
        own = int((head_labels < 0).sum())
        inside = {p for ps, _ in readable for p in ps}
        paths = [path for path, _ in pairs if path not in inside]
        labels = np.array([known[p] for p in paths], dtype=int)
        batches, kept = [b for _, b in readable], []
        loader = stream_loader(paths, first.prep, batch_size=spec.batch_size,
                               workers=decode_workers(spec.num_workers), pin_memory=False,
                               slide_cache=spec.slide_cache) if paths else []
        for pos, x, errors, _ in loader:
            ok = np.array([not e for e in errors], dtype=bool)
            if ok.any():
                batches.append(x[torch.from_numpy(ok)])
                kept += pos.numpy()[ok].tolist()
        kept_labels = np.r_[head_labels, labels[np.array(kept, dtype=int)]].astype(int)
        log.info("quality gate: the first %d images of this deploy and %d labelled images",
                 len(head_labels), int((kept_labels >= 0).sum()))
        return (lambda b: to_input(b, first.norm, torch.device("cpu"), channels_last=False),
                batches, kept_labels, own)

    return inference.Evidence(key, planned, decode)


def verification_pairs(models: list[LoadedModel], spec: InferenceSpec,
                       limit: int = 512) -> list[tuple[Path, str]]:
    """Labelled images for the quality gate: verify_data, else the validation splits of the
    models' training runs (splits.csv beside them). A seeded sample, balanced over classes."""
    classes = models[0].classes
    if spec.verify_data is not None:
        found = [(s.path, s.label) for s in discover(spec.verify_data, need_labels=True).samples]
    else:
        found = [pair for m in models if m.path is not None
                 for pair in splitting.validation_of_model(m.path)]
    by_class: dict[str, list[Path]] = {c: [] for c in classes}
    for path, label in sorted(set(found)):
        if label in by_class:
            by_class[label].append(path)
    rng = np.random.default_rng(0)
    for paths in by_class.values():
        rng.shuffle(paths)
    picked = []
    for i in range(max((len(v) for v in by_class.values()), default=0)):  # round robin
        picked += [(v[i], c) for c, v in by_class.items() if i < len(v)]
    return picked[:limit]

