"""Backbones by name, pretrained/SSL weights, freezing, and the self-describing model file."""

from __future__ import annotations

import logging
import math
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torchvision import models as tvm

from .data import Normalisation
from .errors import ModelError
from .images import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

log = logging.getLogger(__name__)
FORMAT = "thumbclf-model"
FORMAT_VERSION = 1
SSL_PREFIXES = ("module.", "model.", "resnet.", "backbone.", "encoder.")
SSL_FORMAT = "thumbclf-ssl"  # a pretraining checkpoint (pretrain_thumbclassifier.py)
SSL_FORMAT_VERSION = 1
SSL_CHECKPOINT = "ssl_checkpoint.pt"  # its name in a pretraining results folder


@dataclass(frozen=True)
class Arch:
    """How to build one backbone and where its classification head is."""

    build: Callable[..., nn.Module]
    weights: Any
    head: str  # attribute path of the final nn.Linear
    blocks: Callable[[nn.Module], list[tuple[str, nn.Module]]]
    input_size: int = 224


def _top_children(m: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(m.named_children())


def _features_then_rest(m: nn.Module) -> list[tuple[str, nn.Module]]:
    inner = [(f"features.{n}", c) for n, c in m.features.named_children()]
    return inner + [(n, c) for n, c in m.named_children() if n != "features"]


ARCHS: dict[str, Arch] = {
    "resnet18": Arch(tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, "fc", _top_children),
    "resnet34": Arch(tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, "fc", _top_children),
    "resnet50": Arch(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2, "fc", _top_children),
    "densenet121": Arch(tvm.densenet121, tvm.DenseNet121_Weights.IMAGENET1K_V1, "classifier",
                        _features_then_rest),
    "efficientnet_b0": Arch(tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights.IMAGENET1K_V1,
                            "classifier.1", _features_then_rest),
}
LEGACY_NAMES = {"resnet": "resnet50", "densenet": "densenet121"}  # the prototype's names


def arch_name(name: str) -> str:
    """Canonical backbone name; an unknown name lists the valid ones."""
    key = LEGACY_NAMES.get(name, name).lower()
    if key not in ARCHS:
        raise ModelError(f"model_name {name!r} is unknown; valid names: {', '.join(ARCHS)}")
    return key


def _get(m: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        m = getattr(m, part) if not part.isdigit() else m[int(part)]
    return m


def _set_head(m: nn.Module, dotted: str, new: nn.Module) -> None:
    *parent, last = dotted.split(".")
    owner = _get(m, ".".join(parent)) if parent else m
    if last.isdigit():
        owner[int(last)] = new
    else:
        setattr(owner, last, new)


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


def build_model(name: str, num_classes: int, pretrained: bool | Path = False) -> nn.Module:
    """A backbone with a fresh ``num_classes`` head; ImageNet weights if asked for."""
    arch = ARCHS[arch_name(name)]
    model = arch.build(weights=None)
    if pretrained is True:
        try:  # torchvision's own loader would unpickle with weights_only=False
            state = arch.weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - urllib/ssl/hash errors all mean 'no weights'
            raise ModelError(
                f"pretrained: cannot get the ImageNet weights of {name} ({type(exc).__name__}: "
                f"{str(exc)[:120]}); connect once to the internet (torchvision caches them in "
                "~/.cache/torch), set pretrained to a local weights file, or pretrained: false"
            ) from None
        model.load_state_dict(state)
    elif isinstance(pretrained, Path):
        state = _strip_prefixes(_unwrap(read_weights(pretrained, "pretrained weights file")))
        n = _load_matching(model, state, skip=arch.head)
        if n == 0:
            raise ModelError(f"{pretrained}: no tensor matches {name}; is it a {name} "
                             "weights file?")
        log.info("loaded %d tensors of pretrained weights from %s", n, pretrained)
    head = _get(model, arch.head)
    _set_head(model, arch.head, nn.Linear(head.in_features, num_classes))
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
        changed = True
        while changed:
            changed = False
            for prefix in SSL_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor], skip: str) -> int:
    own = model.state_dict()
    usable = {k: v for k, v in state.items()
              if k in own and own[k].shape == v.shape and not k.startswith(skip + ".")}
    model.load_state_dict(usable, strict=False)
    return sum(1 for k in usable if not k.endswith("num_batches_tracked"))


def backbone_only(name: str, pretrained: bool | Path = False) -> tuple[nn.Module, int]:
    """The backbone of ``name`` with an identity in place of its head, and its feature size."""
    head = ARCHS[arch_name(name)].head
    model = build_model(name, 1, pretrained)
    dim = _get(model, head).in_features
    _set_head(model, head, nn.Identity())
    return model, dim


def save_ssl_checkpoint(path: Path, backbone: nn.Module, *, arch: str, prep: Preprocessing,
                        norm: Normalisation, description: dict[str, Any]) -> None:
    """Write a pretraining checkpoint: backbone weights plus what they were made from and how."""
    from .results import atomic_torch_save

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
        return path, _strip_prefixes(_unwrap(obj)), None
    arch = arch_name(name)
    size = input_size or ARCHS[arch].input_size
    if int(obj.get("format_version", 0)) > SSL_FORMAT_VERSION:
        raise ModelError(f"{path}: made by a newer thumbclf (format version "
                         f"{obj['format_version']}); update thumbclf to use it")
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
    head = ARCHS[arch_name(name)].head
    own = model.state_dict()
    backbone = [k for k in own if not k.startswith(head + ".")]
    countable = [k for k in backbone if not k.endswith("num_batches_tracked")]
    if description is not None:
        missing = [k for k in backbone if k not in state]
        wrong = [k for k in backbone if k in state and state[k].shape != own[k].shape]
        if missing or wrong:
            raise ModelError(f"{path}: {len(missing)} backbone tensors missing and {len(wrong)} "
                             f"of another shape (first: {(missing + wrong)[0]}); the checkpoint is "
                             "damaged or altered; pretrain again")
        result = model.load_state_dict({k: state[k] for k in backbone}, strict=False)
        left = [k for k in result.missing_keys if not k.startswith(head + ".")]
        if left:  # cannot happen after the checks above; never train from a half-loaded backbone
            raise ModelError(f"{path}: {len(left)} backbone tensors did not load (first: {left[0]})")
        log.info("SSL: loaded all %d backbone tensors from %s (%s, %s epochs on %s images)",
                 len(countable), path, description.get("method"), description.get("epochs"),
                 description.get("images"))
        return len(countable)
    n = _load_matching(model, state, skip=head)
    if n == 0:
        raise ModelError(f"{path}: no tensor of the SSL checkpoint matches {name} (after removing "
                         f"the prefixes {', '.join(SSL_PREFIXES)}); is it a {name} checkpoint?")
    total = sum(1 for k in own if not k.endswith("num_batches_tracked"))
    log.info("SSL: loaded %d of %d tensors from %s", n, total, path)
    if n < len(countable):
        log.warning("SSL: %d of the %d backbone tensors of %s were not in %s and start from "
                    "random values", len(countable) - n, len(countable), name, path)
    return n


def freeze(model: nn.Module, name: str, ratio: float) -> list[str]:
    """Freeze the first ``ratio`` of the backbone's blocks (never the head); return their names."""
    arch = ARCHS[arch_name(name)]
    blocks = arch.blocks(model)  # the head counts, as in the prototype, but is never frozen
    count = math.floor(ratio * len(blocks) + 1e-9)
    frozen = []
    for block_name, block in blocks[:count]:
        if block_name == arch.head.split(".")[0]:
            continue
        for p in block.parameters():
            p.requires_grad_(False)
        block.eval()
        frozen.append(block_name)
    model._thumbclf_frozen = frozen  # type: ignore[attr-defined]
    return frozen


def train_mode(model: nn.Module) -> None:
    """model.train(), but frozen blocks stay in eval mode (BatchNorm statistics kept)."""
    model.train()
    frozen = set(getattr(model, "_thumbclf_frozen", ()))
    for block_name, block in model.named_modules():
        if block_name in frozen:
            block.eval()


# ---------------------------------------------------------------------------- model files


@dataclass
class LoadedModel:
    """A model ready for inference plus everything needed to feed it."""

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


def save_model(path: Path, model: nn.Module, *, arch: str, classes: tuple[str, ...],
               prep: Preprocessing, norm: Normalisation, threshold: float | None,
               temperature: float, meta: dict[str, Any]) -> None:
    """Write a self-describing model file, loadable with torch.load(weights_only=True)."""
    from .results import atomic_torch_save

    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "arch": arch,
        "classes": list(classes), "input_size": prep.size, "recipe": prep.recipe,
        "slide_size": prep.slide_size, "mean": list(norm.mean), "std": list(norm.std),
        "threshold": threshold, "temperature": float(temperature), "meta": meta,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    atomic_torch_save(payload, path)


def load_model(path: Path, *, model_name: str | None = None,
               target_labels: tuple[str, ...] | None = None, max_pixels: int = 400_000_000,
               slide_size: int | None = None) -> LoadedModel:
    """Load a thumbclf model file, or a prototype state dict (needs target_labels)."""
    obj = read_weights(path, "model file (modelAdr)")
    if obj.get("format") == FORMAT:
        return _load_thumbclf(path, obj, model_name, target_labels, max_pixels, slide_size)
    return _load_legacy(path, obj, model_name, target_labels, max_pixels, slide_size)


def _load_thumbclf(path, obj, model_name, target_labels, max_pixels, slide_size) -> LoadedModel:
    classes = tuple(obj["classes"])
    if target_labels is not None and set(target_labels) != set(classes):
        raise ModelError(f"{path}: the model's classes ({', '.join(classes)}) differ from "
                         f"target_labels ({', '.join(target_labels)}); fix target_labels or "
                         "remove it (the model file names its classes)")
    arch = obj["arch"]
    if model_name is not None and arch_name(model_name) != arch:
        raise ModelError(f"{path}: the model is a {arch}, but model_name says {model_name}; "
                         "remove model_name or correct it")
    model = build_model(arch, len(classes))
    _load_state(model, obj["state_dict"], path)
    prep = Preprocessing(size=int(obj["input_size"]), recipe=obj["recipe"], max_pixels=max_pixels,
                         slide_size=slide_size or int(obj.get("slide_size", 1024)))
    norm = Normalisation(tuple(obj["mean"]), tuple(obj["std"]))
    return LoadedModel(model.eval(), arch, classes, prep, norm, obj.get("threshold"),
                       float(obj.get("temperature", 1.0)), path, False, obj.get("meta", {}))


def _load_legacy(path, state, model_name, target_labels, max_pixels, slide_size) -> LoadedModel:
    state = _strip_prefixes(_unwrap(state))
    if not state:
        raise ModelError(f"{path}: neither a thumbclf model file nor a state dict of weights")
    if target_labels is None:
        raise ModelError(f"{path}: a plain state dict (prototype model) does not name its "
                         "classes; set target_labels (and model_name) in the experiment file")
    arch = arch_name(model_name or "resnet18")
    classes = tuple(sorted(target_labels))
    head_w = state.get(ARCHS[arch].head + ".weight")
    if head_w is not None and head_w.shape[0] != len(classes):
        raise ModelError(f"{path}: the model has {head_w.shape[0]} outputs but target_labels "
                         f"lists {len(classes)} classes; list exactly the model's classes")
    model = build_model(arch, len(classes))
    _load_state(model, state, path)
    log.info("%s: prototype model (%s); classes in alphabetical order: %s", path, arch,
             ", ".join(classes))
    prep = Preprocessing(size=ARCHS[arch].input_size, recipe="legacy", max_pixels=max_pixels,
                         slide_size=slide_size or 1024)
    norm = Normalisation((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return LoadedModel(model.eval(), arch, classes, prep, norm, None, 1.0, path, True, {})


def _load_state(model: nn.Module, state: dict, path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = [line.strip() for line in str(exc).splitlines() if line.strip()][1:2]
        raise ModelError(f"{path}: the weights do not fit the architecture "
                         f"({'; '.join(first)[:200]}); check model_name and target_labels"
                         ) from None


def imagenet_normalisation() -> Normalisation:
    return Normalisation(IMAGENET_MEAN, IMAGENET_STD)
