"""Backbones by name, pretrained/SSL weights, freezing, and the self-describing model file."""

from __future__ import annotations

import functools
import logging
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

from thumbclf.core import layout
from thumbclf.core.backbones import PROTOTYPE_NAMES, arch_name
from thumbclf.core.errors import ModelError
from thumbclf.core.files import atomic_torch_save
from thumbclf.inputs.images import (DEFAULT_MAX_PIXELS, DEFAULT_SLIDE_BUDGET_S, DEFAULT_SLIDE_SIZE,
                                    Preprocessing)
from thumbclf.nn.data import UNNORMALISED, Normalisation
from thumbclf.nn.familiarity import Familiarity, WithFeatures
from thumbclf.nn import modelcheck

log = logging.getLogger(__name__)
FORMAT = "thumbclf-model"
FORMAT_VERSION = 1
SSL_PREFIXES = ("module.", "model.", "resnet.", "backbone.", "encoder.")
SSL_FORMAT = "thumbclf-ssl"  # a pretraining checkpoint (pretrain_thumbclassifier.py)
SSL_FORMAT_VERSION = 1
SSL_CHECKPOINT = layout.SSL_CHECKPOINT  # its name in a pretraining results folder


# Input sizes of the prototype's models (its Initialize_model); prototype state dicts need them.
PROTOTYPE_INPUT_SIZES = {"resnet50": 256, "inception_v3": 299}
# Prototype names whose models came from other packages, with their own weight names.
FOREIGN = {"vit": "the pytorch_pretrained_vit package (ViT('B_32_imagenet1k'), 384 px)",
           "efficient": "the efficientnet_pytorch package (EfficientNet.from_pretrained("
                        "'efficientnet-b7'))"}
FOREIGN_KEYS = {"transformer.blocks.": "vit", "positional_embedding.": "vit",
                "_conv_stem.": "efficient", "_blocks.": "efficient"}
# Builder arguments that make a model the same whether or not ImageNet weights are loaded:
# torchvision switches these on for its pretrained inception_v3/googlenet (inputs are
# ImageNet-normalised; transform_input maps them to the [-1, 1] the weights were trained on).
BUILD_KWARGS = {"inception_v3": {"aux_logits": True, "transform_input": True, "init_weights": True},
                "googlenet": {"aux_logits": False, "transform_input": True, "init_weights": True}}


def _weights(arch: str):
    try:
        return tvm.get_model_weights(arch).DEFAULT
    except (ValueError, AttributeError):
        return None


@functools.cache
def input_size(arch: str) -> int:
    """Side in pixels the architecture is trained at: its ImageNet weights' crop size, else 224."""
    weights = _weights(arch_name(arch))
    crop = getattr(weights.transforms(), "crop_size", None) if weights is not None else None
    return int(crop[0]) if crop else 224


_input_size = input_size  # read_ssl's parameter of the same name hides it


def prototype_input_size(arch: str) -> int:
    """The prototype's input size for an architecture: 256 (ResNet-50), 299 (Inception v3), 224."""
    return PROTOTYPE_INPUT_SIZES.get(arch_name(arch), 224)


def _construct(arch: str, image_size: int | None = None) -> nn.Module:
    kwargs = dict(BUILD_KWARGS.get(arch, {}))
    if arch.startswith("vit_"):  # position embeddings are made for one input size
        kwargs["image_size"] = image_size or input_size(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return tvm.get_model(arch, weights=None, **kwargs)


def head_names(model: nn.Module) -> list[str]:
    """The classification head (the last nn.Linear, or squeezenet's last Conv2d), then any
    auxiliary heads (other layers with as many outputs, e.g. inception's AuxLogits.fc)."""
    known = getattr(model, "_thumbclf_heads", None)
    if known:
        return list(known)
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    layers = linear or [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not layers:
        raise ModelError(f"{type(model).__name__}: no nn.Linear or nn.Conv2d head found")
    main, head = layers[-1]
    outputs = head.out_features if isinstance(head, nn.Linear) else head.out_channels
    aux = [n for n, m in linear[:-1] if m.out_features == outputs] if linear else []
    return [main, *aux]


def _replace_heads(model: nn.Module, num_classes: int) -> None:
    names = head_names(model)
    for name in names:
        old = model.get_submodule(name)
        if isinstance(old, nn.Linear):
            new: nn.Module = nn.Linear(old.in_features, num_classes)
        else:
            new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
        _put(model, name, new)
    model._thumbclf_heads = names  # type: ignore[attr-defined]


def _put(model: nn.Module, name: str, new: nn.Module) -> None:
    """``new`` in place of ``model``'s submodule ``name`` (dotted; a number: a Sequential's)."""
    parent, _, last = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if last.isdigit():
        owner[int(last)] = new
    else:
        setattr(owner, last, new)


def _is_head_key(key: str, heads: list[str]) -> bool:
    return any(key.startswith(h + ".") for h in heads)


def read_weights(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a file, loaded with weights_only=True; clear errors otherwise."""
    if not path.is_file():
        raise ModelError(f"{path}: {what} not found; check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(f"{path}: refused: the file holds pickled Python objects, not just "
                         "weights, and thumbclf never runs code from model files; re-save it "
                         f"with torch.save(model.state_dict(), ...) ({str(exc).splitlines()[0]})"
                         ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable PyTorch file, perhaps truncated or corrupt "
                         f"({str(exc).splitlines()[0][:200]}); copy it again") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: expected a dictionary of weights; got {type(obj).__name__}")
    return obj


def build_model(name: str, num_classes: int, pretrained: bool | Path = False, *,
                image_size: int | None = None) -> nn.Module:
    """A backbone with fresh ``num_classes`` head(s); ImageNet weights if asked for."""
    arch = arch_name(name)
    model = _construct(arch, image_size)
    heads = head_names(model)
    if pretrained is True:
        weights = _weights(arch)
        try:  # torchvision's own loader would unpickle arbitrary objects: ours does not
            if weights is None:
                raise LookupError("torchvision has no ImageNet weights for it")
            state = weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - urllib/ssl/hash errors all mean 'no weights'
            raise ModelError(
                f"pretrained: cannot get the ImageNet weights of {name} ({type(exc).__name__}: "
                f"{str(exc)[:120]}); connect once to the internet (torchvision caches them in "
                "~/.cache/torch), set pretrained to a local weights file, or pretrained: false"
            ) from None
        own = model.state_dict()  # googlenet's unused auxiliary heads are not built
        model.load_state_dict({k: v for k, v in state.items() if k in own})
    elif isinstance(pretrained, Path):
        state = _strip_prefixes(_unwrap(read_weights(pretrained, "pretrained weights file")))
        n = _load_matching(model, state, skip=heads)
        if n == 0:
            raise ModelError(f"{pretrained}: no tensor matches {name}; is it a {name} "
                             "weights file?")
        log.info("loaded %d tensors of pretrained weights from %s", n, pretrained)
    _replace_heads(model, num_classes)
    return model


def _unwrap(ckpt: dict) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model_state_dict", "model", "teacher", "student"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    return ckpt


def _strip_prefixes(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        while key.startswith(SSL_PREFIXES):  # no prefix begins another: one matches at most
            key = key[len(next(p for p in SSL_PREFIXES if key.startswith(p))):]
        out[key] = value
    return out


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor], skip: list[str]) -> int:
    own = model.state_dict()
    usable = {k: v for k, v in state.items()
              if k in own and own[k].shape == v.shape and not _is_head_key(k, skip)}
    model.load_state_dict(usable, strict=False)
    return sum(1 for k in usable if not k.endswith("num_batches_tracked"))


def backbone_only(name: str, pretrained: bool | Path = False) -> tuple[nn.Module, int]:
    """The backbone of ``name`` with an identity in place of its head, and its feature size."""
    model = build_model(name, 1, pretrained)
    head = head_names(model)[0]
    old = model.get_submodule(head)
    dim = old.in_features if isinstance(old, nn.Linear) else old.in_channels
    _put(model, head, nn.Identity())
    return model, dim


def _finite_or_refuse(model: nn.Module, path: Path) -> None:
    """Never write a model file of NaN or infinite weights (a training that diverged)."""
    bad = modelcheck.non_finite_tensors(model.state_dict())
    if bad:
        from thumbclf.core.errors import ConfigError

        raise ConfigError(f"training diverged: {len(bad)} tensors of the model hold NaN or "
                          f"infinite values (first: {bad[0]}); {path.name} was not written. "
                          "Lower lr, or check the images")


def save_ssl_checkpoint(path: Path, backbone: nn.Module, *, arch: str, prep: Preprocessing,
                        norm: Normalisation, description: dict[str, Any]) -> None:
    """Write a pretraining checkpoint: backbone weights plus what they were made from and how."""
    _finite_or_refuse(backbone, path)
    payload = {
        "format": SSL_FORMAT, "format_version": SSL_FORMAT_VERSION, "arch": arch,
        "input_size": prep.size, "recipe": prep.recipe, "slide_size": prep.slide_size,
        "mean": list(norm.mean), "std": list(norm.std), **description,
        "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
    }
    atomic_torch_save(payload, path)


def read_ssl(path: Path, name: str, input_size: int | None = None
             ) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any] | None]:
    """The file, weights and description (None: not made by thumbclf) of an SSL checkpoint.

    ``path`` may be a pretraining results folder. A thumbclf checkpoint made for another
    architecture or input size is refused.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / SSL_CHECKPOINT).is_file():
            raise ModelError(f"{path}: the folder holds no {SSL_CHECKPOINT}; point modelAdr at a "
                             "finished pretraining results folder or at the checkpoint file")
        path = path / SSL_CHECKPOINT
    obj = read_weights(path, "SSL checkpoint (modelAdr)")
    if obj.get("format") != SSL_FORMAT:
        state = _strip_prefixes(_unwrap(obj))
        problem = modelcheck.non_finite_problem(state, "the pretraining")
        if problem:
            raise ModelError(f"{path}: {problem}")
        return path, state, None
    modelcheck.check_ssl(path, obj, SSL_FORMAT_VERSION)
    arch = arch_name(name)
    size = input_size or _input_size(arch)
    if obj.get("arch") != arch:
        raise ModelError(f"{path}: pretrained as a {obj.get('arch')}, but model_name is {name}; "
                         f"set model_name: {obj.get('arch')}, or pretrain again with model_name: "
                         f"{name}")
    if int(obj.get("input_size", -1)) != size:
        raise ModelError(f"{path}: pretrained on {obj.get('input_size')}-pixel inputs, but {arch} "
                         f"here takes {size}-pixel inputs; pretrain again at {size} pixels")
    description = {k: v for k, v in obj.items() if k != "state_dict"}
    return path, obj["state_dict"], description


def load_ssl(model: nn.Module, path: Path, name: str, input_size: int | None = None) -> int:
    """Initialise the backbone from a self-supervised checkpoint; return the tensors loaded.

    A thumbclf pretraining checkpoint must supply every backbone tensor; a checkpoint made
    elsewhere loads what matches (after removing the prefixes SSL_PREFIXES).
    """
    path, state, description = read_ssl(path, name, input_size)
    heads = head_names(model)
    own = model.state_dict()
    backbone = [k for k in own if not _is_head_key(k, heads)]
    countable = [k for k in backbone if not k.endswith("num_batches_tracked")]
    if description is not None:
        missing = [k for k in backbone if k not in state]
        wrong = [k for k in backbone if k in state and state[k].shape != own[k].shape]
        if missing or wrong:
            raise ModelError(f"{path}: {len(missing)} backbone tensors missing and {len(wrong)} "
                             f"of another shape (first: {(missing + wrong)[0]}); the checkpoint is "
                             "damaged or altered; pretrain again")
        result = model.load_state_dict({k: state[k] for k in backbone}, strict=False)
        left = [k for k in result.missing_keys if not _is_head_key(k, heads)]
        if left:  # cannot happen after the checks above; never train from a half-loaded backbone
            raise ModelError(f"{path}: {len(left)} backbone tensors did not load (first: {left[0]})")
        log.info("SSL: loaded all %d backbone tensors from %s (%s, %s epochs on %s images)",
                 len(countable), path, description.get("method"), description.get("epochs"),
                 description.get("images"))
        return len(countable)
    n = _load_matching(model, state, skip=heads)
    if n == 0:
        raise ModelError(f"{path}: no tensor of the SSL checkpoint matches {name} (after removing "
                         f"the prefixes {', '.join(SSL_PREFIXES)}); is it a {name} checkpoint?")
    total = sum(1 for k in own if not k.endswith("num_batches_tracked"))
    log.info("SSL: loaded %d of %d tensors from %s", n, total, path)
    if n < len(countable):
        log.warning("SSL: %d of the %d backbone tensors of %s were not in %s and start from "
                    "random values", len(countable) - n, len(countable), name, path)
    return n


# ---------------------------------------------------------------------------- model files


@dataclass
class LoadedModel:
    """A model ready for inference plus everything needed to feed it: what a model file holds
    (save_model writes it, load_model reads it back)."""

    model: nn.Module
    arch: str
    classes: tuple[str, ...]
    prep: Preprocessing
    norm: Normalisation
    threshold: float | None = None
    temperature: float = 1.0
    path: Path | None = None
    legacy: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    familiarity: Familiarity | None = None  # None: older model files, confidence only
    calibration: dict[str, Any] = field(default_factory=dict)

    def runnable(self) -> nn.Module:
        """What inference runs: the model, with its features beside the logits where the model
        file has the unfamiliar-slide rule."""
        if self.familiarity is None:
            return self.model
        return WithFeatures(self.model, head_names(self.model)[0]).eval()


def save_model(path: Path, m: LoadedModel) -> None:
    """Write a self-describing model file, loadable with torch.load(weights_only=True) and
    read back by load_model (everything of ``m`` but its ``path`` and ``legacy``)."""
    _finite_or_refuse(m.model, path)
    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "arch": m.arch,
        "classes": list(m.classes), "input_size": m.prep.size, "recipe": m.prep.recipe,
        "slide_size": m.prep.slide_size, "mean": list(m.norm.mean), "std": list(m.norm.std),
        "threshold": m.threshold, "temperature": float(m.temperature), "meta": m.meta,
        "state_dict": {k: v.detach().cpu() for k, v in m.model.state_dict().items()},
    }
    if m.familiarity is not None:
        payload["familiarity"] = m.familiarity.to_file()
    if m.calibration:
        payload["calibration"] = m.calibration
    atomic_torch_save(payload, path)


def load_model(path: Path, *, model_name: str | None = None,
               target_labels: tuple[str, ...] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               slide_size: int | None = None,
               slide_budget_s: float = DEFAULT_SLIDE_BUDGET_S) -> LoadedModel:
    """Load a thumbclf model file, or a prototype state dict (needs target_labels).
    ``max_pixels`` and ``slide_budget_s`` are limits of this run, not of the model: they go
    into its Preprocessing here, whatever the file."""
    obj = read_weights(path, "model file (modelAdr)")
    load = _load_thumbclf if obj.get("format") == FORMAT else _load_legacy
    loaded = load(path, obj, model_name, target_labels, slide_size)
    loaded.prep = replace(loaded.prep, max_pixels=max_pixels, slide_budget_s=slide_budget_s)
    return loaded


def _load_thumbclf(path, obj, model_name, target_labels, slide_size) -> LoadedModel:
    modelcheck.check_model(path, obj, FORMAT_VERSION)  # every field, before anything is built
    classes = tuple(obj["classes"])
    if target_labels is not None and set(target_labels) != set(classes):
        raise ModelError(f"{path}: the model's classes ({', '.join(classes)}) differ from "
                         f"target_labels ({', '.join(target_labels)}); fix target_labels or "
                         "remove it (the model file names its classes)")
    arch = arch_name(obj["arch"])
    if model_name is not None and arch_name(model_name) != arch:
        raise ModelError(f"{path}: the model is a {arch}, but model_name says {model_name}; "
                         "remove model_name or correct it")
    model = _with_state(arch, len(classes), int(obj["input_size"]), obj["state_dict"], path)
    prep = Preprocessing(size=int(obj["input_size"]), recipe=obj["recipe"],
                         slide_size=slide_size or int(obj.get("slide_size", DEFAULT_SLIDE_SIZE)))
    norm = Normalisation(tuple(obj["mean"]), tuple(obj["std"]))
    rule = obj.get("familiarity")
    if rule:
        head = model.get_submodule(head_names(model)[0])
        modelcheck.check_feature_size(path, int(rule["bank"].shape[1]), int(
            head.in_features if isinstance(head, nn.Linear) else head.in_channels))
    return LoadedModel(model.eval(), arch, classes, prep, norm, obj.get("threshold"),
                       float(obj.get("temperature", 1.0)), path, False, obj.get("meta", {}),
                       Familiarity.from_file(rule), dict(obj.get("calibration") or {}))


def _load_legacy(path, state, model_name, target_labels, slide_size) -> LoadedModel:
    state = _strip_prefixes(_unwrap(state))
    if not state:
        raise ModelError(f"{path}: neither a thumbclf model file nor a state dict of weights")
    if target_labels is None:
        raise ModelError(f"{path}: a plain state dict (prototype model) does not name its "
                         "classes; set target_labels (and model_name) in the experiment file")
    given = str(model_name or "resnet18").strip().lower()
    foreign = next((v for k, v in FOREIGN_KEYS.items() if any(s.startswith(k) for s in state)),
                   given if given in FOREIGN else None)
    if foreign is not None:
        raise ModelError(f"{path}: the prototype's '{foreign}' models came from {FOREIGN[foreign]}"
                         ", whose weight names differ from torchvision's; thumbclf cannot deploy "
                         f"them. Retrain with model_name: {foreign} (torchvision's "
                         f"{PROTOTYPE_NAMES[foreign]})")
    arch = arch_name(given)
    classes = tuple(sorted(target_labels))
    size = prototype_input_size(arch)
    with torch.device("meta"):
        head_w = state.get(head_names(build_model(arch, len(classes)))[0] + ".weight")
    if head_w is not None and head_w.shape[0] != len(classes):
        raise ModelError(f"{path}: the model has {head_w.shape[0]} outputs but target_labels "
                         f"lists {len(classes)} classes; list exactly the model's classes")
    problem = modelcheck.non_finite_problem(state)
    if problem:
        raise ModelError(f"{path}: {problem}")
    model = _with_state(arch, len(classes), size, state, path)
    log.info("%s: prototype model (%s, %d px); classes in alphabetical order: %s", path, arch,
             size, ", ".join(classes))
    prep = Preprocessing(size=size, recipe="legacy", slide_size=slide_size or DEFAULT_SLIDE_SIZE)
    return LoadedModel(model.eval(), arch, classes, prep, UNNORMALISED, None, 1.0, path, True, {})


def _with_state(arch: str, n_classes: int, size: int, state: dict, path: Path) -> nn.Module:
    """``arch`` built on the meta device and given the file's tensors (its weights are not
    first drawn at random: 2 s for a VGG16); as before where the file's dtypes or tensors differ."""
    with torch.device("meta"):
        model = build_model(arch, n_classes, image_size=size)
    if all(k in state and state[k].dtype == v.dtype for k, v in model.state_dict().items()):
        _load_state(model, state, path, assign=True)
        if not any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            return model
    model = build_model(arch, n_classes, image_size=size)
    _load_state(model, state, path)
    return model


def _load_state(model: nn.Module, state: dict, path: Path, assign: bool = False) -> None:
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as exc:
        first = [line.strip() for line in str(exc).splitlines() if line.strip()][1:2]
        raise ModelError(f"{path}: the weights do not fit the architecture "
                         f"({'; '.join(first)[:200]}); check model_name and target_labels"
                         ) from None

