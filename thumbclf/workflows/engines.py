"""The inference engine of a deploy: the quality gate's images (a sample of the deploy's own,
and labelled ones), then each model's verified engine and precision (engine, precision keys)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from thumbclf.config import DeployParams
from thumbclf.core.errors import ImageReadError
from thumbclf.inputs import splits as splitting
from thumbclf.inputs.decode import load_array
from thumbclf.inputs.samples import SampleSet, discover
from thumbclf.nn.data import stream_loader, to_input
from thumbclf.nn.models import LoadedModel
from thumbclf.predict import gate, inference
from thumbclf.predict.local import decode_workers

log = logging.getLogger(__name__)


def prepare_runners(models: list[LoadedModel], params: DeployParams, sample_set: SampleSet,
                    device: torch.device, threshold: float, *, progress: bool = False
                    ) -> tuple[list[inference.Runner], str]:
    """The inference engine and precision of each model (engine, precision keys), verified;
    ``progress``: show the int8 quantisation's progress bars."""
    first = models[0]
    slide_cache = params.slide_cache
    evidence = gate_evidence(models, params, sample_set)

    def calibration():  # int8: unlabelled deploy images, as the model will see them
        arrays = []
        for s in sample_set.samples[:256]:
            try:
                arrays.append(load_array(s.path, first.prep, slide_cache=slide_cache))
            except ImageReadError:
                continue
        for i in range(0, len(arrays), 32):
            yield to_input(torch.from_numpy(np.stack(arrays[i:i + 32])), first.norm,
                           torch.device("cpu"), channels_last=False)

    spec = inference.EngineSpec(engine=params.engine, precision=params.precision,
                                cache_dir=params.cache_root, device=device, progress=progress)
    runners, notes = [], []
    for m in models:
        model = inference.ModelSpec(
            m.runnable(), m.path, m.prep.size, m.classes, threshold, m.temperature,
            channels_last=not m.legacy, familiarity=m.familiarity)
        runner, why = inference.choose(model, spec, lambda: evidence, calibration)
        runners.append(runner)
        notes.append(why)
    inference.ensemble_band(runners, threshold)
    why = notes[0] if len(set(notes)) == 1 else "; ".join(
        f"{m.path.name}: {n}" for m, n in zip(models, notes))
    log.info("inference: %s", why)
    return runners, why


def gate_evidence(models: list[LoadedModel], params: DeployParams,
                  sample_set: SampleSet) -> inference.Evidence:
    """The quality gate's images: a seeded sample of up to gate.AGREEMENT_IMAGES of the deploy's
    own (labels unused, so a labelled and an unlabelled deploy of the same images check the
    same ones), then the labelled verification images (verification_pairs). Decoded in the
    decoding workers, once for every model and candidate, and only if a verdict is needed."""
    first = models[0]
    pairs = verification_pairs(models, params)
    labelled = {path for path, _ in pairs}
    order = np.random.default_rng(0).permutation(len(sample_set))
    own = [p for p in (sample_set.samples[i].path for i in order) if p not in labelled]
    own = own[:gate.AGREEMENT_IMAGES]
    paths = own + [path for path, _ in pairs]
    labels = np.array([-1] * len(own) + [first.classes.index(lab) for _, lab in pairs], dtype=int)
    key = hashlib.sha1("\n".join(f"{p}|{lab}" for p, lab in zip(paths, labels)).encode(
        "utf-8", "surrogateescape")).hexdigest()

    def decode():
        loader = stream_loader(paths, first.prep, batch_size=params.batch_size,
                               workers=decode_workers(params.num_workers), pin_memory=False,
                               slide_cache=slide_cache)
        batches, kept = [], []
        for pos, x, errors in loader:
            ok = np.array([not e for e in errors], dtype=bool)
            if ok.any():
                batches.append(x[torch.from_numpy(ok)])
                kept += pos.numpy()[ok].tolist()
        kept_labels = labels[np.array(kept, dtype=int)]
        deploy = int((kept_labels < 0).sum())
        log.info("quality gate: %d of this deploy's images and %d labelled images decoded",
                 deploy, len(kept) - deploy)
        return (lambda b: to_input(b, first.norm, torch.device("cpu"), channels_last=False),
                batches, kept_labels, deploy)

    slide_cache = params.slide_cache
    return inference.Evidence(key, len(paths), decode)


def verification_pairs(models: list[LoadedModel], params: DeployParams,
                       limit: int = 512) -> list[tuple[Path, str]]:
    """Labelled images for the quality gate: verify_data, else the validation splits of the
    models' training runs (splits.csv beside them). A seeded sample, balanced over classes."""
    classes = models[0].classes
    if params.verify_data is not None:
        found = [(s.path, s.label) for s in discover(params.verify_data, need_labels=True).samples]
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

