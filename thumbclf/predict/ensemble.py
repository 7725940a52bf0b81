"""An ensemble of loaded models: their reference runners, the averaged calibrated prediction
(with test-time augmentation) and BatchNorm adaptation to a deploy's images."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from thumbclf.core import layout
from thumbclf.core.errors import ConfigError, ImageReadError, ModelError
from thumbclf.core.files import atomic_torch_save
from thumbclf.inputs.decode import load_array
from thumbclf.inputs.samples import SampleSet
from thumbclf.nn import familiarity, look
from thumbclf.nn.data import to_input
from thumbclf.nn.augment import dihedral
from thumbclf.nn.training import recalibrate_bn, softmax
from thumbclf.nn.models import LoadedModel, read_weights
from thumbclf.predict import gate, inference

log = logging.getLogger(__name__)


def exact_runners(models: list[LoadedModel], device: torch.device) -> list[inference.Runner]:
    """PyTorch fp32 (on CUDA: its autocast) for every model: the reference arithmetic."""
    return [inference.torch_runner(m.runnable(), device, "fp32", not m.legacy) for m in models]


@torch.inference_mode()
def ensemble_predict(models: list[LoadedModel], runners: list[inference.Runner], x: torch.Tensor,
                     device: torch.device, tta: bool, looks: np.ndarray | None = None
                     ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Average of each model's calibrated softmax (over 8 flips/rotations with TTA) of uint8
    images ``x`` (n, H, W, 3), and the decision step's other inputs by table column (the tissue
    fraction; the unfamiliarity and its parts where the models have the rule:
    familiarity.ensemble_signals). Runners of a verified reduced precision compute every image,
    and PyTorch fp32 computes again those in their band (gate.Band, issue 29), so that every
    decision is fp32's; a recomputed image that differed by more than the band knew widens it.
    ``looks``: look.measured of ``x`` where the decoding worker measured it, else measured
    here."""
    first = models[0]
    inputs = to_input(x, first.norm, device, channels_last=not first.legacy)
    probs, features = _outputs(models, runners, inputs, tta)
    band = runners[0].band if runners else None
    if band is not None:
        rules = [m.familiarity for m in models]
        content = _content(rules, features)
        redo = band.near(probs, content)
        if redo.any():
            rows = torch.from_numpy(np.flatnonzero(redo)).to(inputs.device)
            exact = [r.exact or r for r in runners]
            p2, f2 = _outputs(models, exact, inputs.index_select(0, rows), tta)
            band.learn(gate.discrepancy(p2, probs[redo], _content(rules, f2),
                                        None if content is None else content[redo]))
            probs[redo] = p2
            for f, g in zip(features, f2):
                f[redo] = g
    looks, tissue = look.describe(x) if looks is None else look.parts(looks)
    signals = familiarity.ensemble_signals([m.familiarity for m in models], features, looks,
                                           tissue)
    return probs, signals


def _outputs(models: list[LoadedModel], runners: list[inference.Runner], inputs: torch.Tensor,
             tta: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """The models' mean calibrated probabilities and each model's features."""
    n_classes = len(models[0].classes)
    total, features = None, []
    for m, run in zip(models, runners):
        if tta:
            out = torch.stack([run(dihedral(inputs, k)) for k in range(8)]).mean(0)
        else:
            out = run(inputs)
        logits, feats = familiarity.split(out.float().numpy(), n_classes)
        if not (np.isfinite(logits).all() and np.isfinite(feats).all()):
            raise ModelError(f"{m.path or 'the model'}: computed outputs that are not finite "
                             "(NaN or infinity) for readable images; its weights are damaged or "
                             "overflow; train again (its predictions cannot be trusted)")
        features.append(np.array(feats))
        p = softmax(logits, m.temperature)
        total = p if total is None else total + p
    return total / len(models), features


def _content(rules: list, features: list[np.ndarray]) -> np.ndarray | None:
    """The content part of the unfamiliarity (the part the model computes), as
    familiarity.ensemble_signals averages it; None where a model has no rule."""
    if not rules or any(r is None for r in rules) or not features[0].shape[1]:
        return None
    return np.mean([r.unfamiliarity(f) for r, f in zip(rules, features)], axis=0)


ADAPT_IMAGES = 512
# fewer deploy images than this: BatchNorm statistics of a few images describe those images,
# not the lab (3 images made a Fat slide a confident IHC), so adapt_bn is refused
MIN_ADAPT_IMAGES = 32


def check_adaptable(images: int, source, copies: int = 0) -> None:
    """ConfigError unless there are at least MIN_ADAPT_IMAGES (readable, distinct) deploy
    images; ``copies``: the images left out as copies of another's content."""
    if images < MIN_ADAPT_IMAGES:
        dup = f" ({copies} more were copies of these: copies count once)" if copies else ""
        raise ConfigError(f"{source}: adapt_bn needs at least {MIN_ADAPT_IMAGES} readable deploy "
                          f"images to re-estimate BatchNorm statistics; got {images}{dup}. Set "
                          "adapt_bn: false, or deploy more images at once")


def _distinct_arrays(sample_set: SampleSet, picked, prep, slide_cache: Path
                     ) -> tuple[list[np.ndarray], int]:
    """Up to ADAPT_IMAGES decoded images of distinct content (issue 33: 32 copies of one
    thumbnail passed the minimum), and how many copies were left out."""
    arrays: list[np.ndarray] = []
    seen: set[bytes] = set()
    copies = 0
    for i in picked:
        try:
            arr = load_array(sample_set.samples[i].path, prep, slide_cache=slide_cache)
        except ImageReadError:
            continue
        digest = hashlib.sha1(np.ascontiguousarray(arr).tobytes()).digest()
        if digest in seen:
            copies += 1
            continue
        seen.add(digest)
        arrays.append(arr)
        if len(arrays) == ADAPT_IMAGES:
            break
    return arrays, copies


def adapt_batchnorm(models: list[LoadedModel], sample_set: SampleSet, folder: Path, *,
                    device: torch.device, slide_cache: Path, resume: bool) -> list[LoadedModel]:
    """Copies of the models whose BatchNorm statistics are re-estimated on up to 512 deploy
    images (a seeded sample; no labels used), so that another lab's stain and scanner look
    normal to them. Only the layers that trained are adapted: a frozen layer (freezeRatio)
    kept its ImageNet or initial statistics in training, and the layers after it learned with
    those. The model files are not changed; the statistics are saved as
    adapted_bn/model_<i>.pt and read back on --resume, so a resumed run predicts with the
    same ones. The look part of the adapted models' unfamiliar rule is adapted too
    (Look.adapted_to, from the look statistics of the same images, adapted_bn/looks.pt):
    against the training looks alone it kept all of the synthetic lab shift 1.5 Undecided
    after adaptation for one of three trained models, although 99% of it was classified right
    (bench/realworld.py)."""
    out = folder / layout.ADAPTED_BN
    picked = np.random.default_rng(0).permutation(len(sample_set))[:ADAPT_IMAGES * 2]
    arrays: list[np.ndarray] = []

    def decoded() -> list[np.ndarray]:
        if not arrays:  # decoded once, for every model and the looks
            found, copies = _distinct_arrays(sample_set, picked, models[0].prep, slide_cache)
            arrays.extend(found)
            check_adaptable(len(arrays), "the readable deploy images", copies)
        return arrays

    adapted, changed = [], []
    for i, m in enumerate(models, 1):
        model, done = _adapt_one(m, out / f"model_{i}.pt", decoded, device=device, resume=resume)
        adapted.append(dataclasses.replace(m, model=model))
        changed.append(done and m.familiarity is not None and m.familiarity.look is not None)
    if any(changed):
        looks = adapted_looks(out / "looks.pt", decoded, resume)
        adapted = [dataclasses.replace(m, familiarity=dataclasses.replace(
            m.familiarity, look=m.familiarity.look.adapted_to(looks))) if c else m
            for m, c in zip(adapted, changed)]
    return adapted


def _adapt_one(m: LoadedModel, saved: Path, decoded: Callable[[], list[np.ndarray]], *,
               device: torch.device, resume: bool) -> tuple[torch.nn.Module, bool]:
    """A copy of ``m``'s network with its trainable BatchNorm statistics re-estimated on the
    images ``decoded()`` gives and saved at ``saved`` (read back from there on --resume);
    whether any were."""
    model = copy.deepcopy(m.model).eval()
    bns = adaptable_layers(model, m.meta)
    if not bns:
        log.warning("%s has no trainable BatchNorm layers: adapt_bn changes nothing", m.path)
        return model, False
    if resume and saved.is_file():
        model.load_state_dict(read_weights(saved, "adapted BatchNorm statistics"), strict=False)
        log.info("adapt_bn: the BatchNorm statistics of the interrupted run (%s)", saved)
        return model.cpu().eval(), True
    for mod in bns.values():
        mod.train()
    images = decoded()
    batches = ((torch.from_numpy(np.stack(images[i:i + 32])), None)  # BatchNorm needs two
               for i in range(0, len(images), 32) if len(images[i:i + 32]) > 1)
    recalibrate_bn(model.to(device), batches, norm=m.norm, device=device,
                   max_images=ADAPT_IMAGES)
    model.eval()
    atomic_torch_save({k: v.detach().cpu() for k, v in model.named_buffers()
                       if k.rpartition(".")[0] in bns}, saved)  # statistics only
    log.info("adapt_bn: BatchNorm statistics of %s re-estimated on %d deploy images; saved in %s "
             "(the model file is unchanged)", m.path.name if m.path else "the model",
             len(images), saved)
    return model.cpu().eval(), True


def adaptable_layers(model: torch.nn.Module, meta: dict) -> dict[str, torch.nn.Module]:
    """The BatchNorm layers adapt_bn re-estimates, by name: those that track statistics and
    trained (a frozen layer kept its ImageNet or initial statistics in training)."""
    frozen = tuple(meta.get("frozen", ()))
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.track_running_stats
            and not any(name == f or name.startswith(f + ".") for f in frozen)}


def adapted_looks(path: Path, decoded: Callable[[], list[np.ndarray]], resume: bool
                  ) -> np.ndarray:
    """The look statistics of the adaptation's images (``decoded()``), saved at ``path`` and
    read back on --resume."""
    if resume and path.is_file():
        log.info("adapt_bn: the looks of the interrupted run's images (%s)", path)
        return read_weights(path, "the looks of the adaptation's images")["looks"].double().numpy()
    images = decoded()
    stats = look.of_images(lambda at: np.stack([images[i] for i in at]),
                           np.arange(len(images)))[0]
    atomic_torch_save({"looks": torch.from_numpy(stats)}, path)
    return stats
