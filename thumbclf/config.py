"""Experiment files -> validated, frozen params objects.

One table (`KEYS`) lists every key: its canonical snake_case name, the spellings of the
original prototype, its type rule, default and meaning. Loading reports every problem of a
file at once, one line each, in the shape ``FILE: KEY must be ...; got VALUE``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

import yaml

from . import layout
from .decide import UNDECIDED
from .errors import ConfigError, ModelError
from .images import DEFAULT_MAX_PIXELS, DEFAULT_SLIDE_SIZE

TRAIN, DEPLOY, PRETRAIN = "train", "deploy", "pretrain"
BOTH = (TRAIN, DEPLOY)
ALL = (TRAIN, DEPLOY, PRETRAIN)
TRAIN_PRETRAIN = (TRAIN, PRETRAIN)


@dataclass(frozen=True)
class Key:
    """One experiment-file key: name, accepted spellings, rule, default and meaning."""

    name: str
    rule: str
    default: Any
    doc: str
    aliases: tuple[str, ...] = ()
    workflows: tuple[str, ...] = BOTH
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()


# rule names: path, paths (one path or a list), int, float, bool, labels (list of str),
# choice, pretrained (bool or path), threshold (float or null), str, model (a backbone name).
# As the prototype read them: numbers may be quoted ("8", "1e-4"), booleans may be 1 or 0.
KEYS: tuple[Key, ...] = (
    Key("thumb_data", "path", None, "Table (.csv/.tsv/.xlsx with PATH, CLASSIFICATION[, PATIENT]) "
        "or folder of thumbnails/slides (one subfolder per class, or for pretrain any folder: no "
        "labels needed).", ("thumbData",), ALL),
    Key("target_labels", "labels", None, "Classes to use, in this order; rows with other labels "
        "are left out. Default: every label present.", ()),
    Key("model_path", "paths", None, "Deploy: model file, list of model files, or a training "
        "results folder (its fold models are averaged). Train with SSL: the SSL checkpoint.",
        ("modelAdr",)),
    Key("batch_size", "int", 64, "Images per batch (pretrain: images per batch, two views "
        "each).", (), ALL, 1, 65536),
    Key("prediction_threshold", "threshold", None, "A decision needs at least this probability, "
        "else 'Undecided'. Default 0.9 (deploy: the model file's threshold, if it has one).",
        (), BOTH, 0.0, 1.0),
    Key("target_accuracy", "threshold", None, "Choose the threshold that reaches this "
        "accuracy on the validation data instead of prediction_threshold.", (), (TRAIN,), 0.0, 1.0),
    Key("max_epochs", "int", 50, "Never train longer than this (pretrain: the epochs to run; "
        "default 100).", (), TRAIN_PRETRAIN, 1, 100000),
    Key("seed", "int", 1, "Seed for splits, initialisation and augmentation.", (), ALL, 0,
        2**32 - 1),
    Key("model_name", "model", "resnet18", "Backbone: any torchvision classification model "
        "(resnet18, convnext_tiny, efficientnet_v2_s, vit_b_16, mobilenet_v3_large, ...: "
        "torchvision.models.list_models(module=torchvision.models)), or a prototype name: resnet "
        "(resnet50, 256 px for prototype models), resnet18, alexnet, vgg (vgg11_bn), vgg16 "
        "(vgg16_bn), squeezenet (squeezenet1_0), densenet (densenet121), inception "
        "(inception_v3, 299 px), vit (vit_b_32), efficient (efficientnet_b7). Input size: the "
        "architecture's own (its ImageNet weights' crop size).", (), ALL),
    Key("has_labels", "bool", True, "Deploy: the input has labels; evaluate against them.",
        ("hasLabels",), (DEPLOY,)),
    Key("sort_thumbs", "bool", False, "Deploy: copy each thumbnail into sorted/<decision>/.",
        ("sortThumbs",), (DEPLOY,)),
    Key("sort_slides", "bool", False, "Deploy: also copy slide files into sorted/<decision>/.",
        ("sortSlides",), (DEPLOY,)),
    Key("train_full", "bool", False, "Train one final model on all data (minus a validation "
        "split) instead of cross-validation.", ("trainFull",), (TRAIN,)),
    Key("fold_number", "int", 3, "Number of cross-validation folds.", ("foldNumber",), (TRAIN,), 2, 100),
    Key("lr", "float", 1e-4, "Adam learning rate (pretrain: peak of the warm-up/cosine "
        "schedule; default 1e-3).", ("learning_rate",), TRAIN_PRETRAIN, 0.0, 10.0),
    Key("wd", "float", 1e-4, "Adam weight decay (pretrain: default 1e-6).", ("weight_decay",),
        TRAIN_PRETRAIN, 0.0, 10.0),
    Key("patience", "int", 10, "Early stopping: epochs without a better validation loss.",
        (), (TRAIN,), 1, 100000),
    Key("stop_epoch", "int", 20, "Early stopping never stops before this epoch.", ("stopEpoch",),
        (TRAIN,), 0, 100000),
    Key("freeze_ratio", "float", 0.5, "Fraction of the network's blocks frozen, in order (never "
        "the head): its top-level children, where one holding over 80% of the parameters is "
        "split into its own children (ResNet: conv1 ... layer4, fc; VGG: the layers of "
        "features; ViT: its encoder layers).",
        ("freezeRatio",), (TRAIN,), 0.0, 1.0),
    Key("ssl", "bool", False, "Initialise the backbone from the self-supervised checkpoint at "
        "modelAdr.", ("SSL",), (TRAIN,)),
    Key("pretrained", "pretrained", True, "true: ImageNet weights (torchvision download/cache); "
        "false: from scratch; or a path to a local weights file (pretrain: the starting point; "
        "default false).", (), TRAIN_PRETRAIN),
    Key("val_fraction", "float", 0.2, "Share of the training data held out for early stopping.",
        (), (TRAIN,), 0.01, 0.5),
    Key("cm_sortlabels", "labels", None, "Order of classes in the confusion matrix.", ()),
    Key("cm_xlabels", "labels", None, "Tick labels of the confusion matrix's columns (classes "
        "in cm_sortlabels order, then Undecided).", ()),
    Key("cm_ylabels", "labels", None, "Tick labels of the confusion matrix's rows.", ()),
    Key("augment", "bool", True, "Flips, 90-degree rotations, mild colour and scale jitter "
        "(training only).", (), (TRAIN,)),
    Key("class_balance", "choice", "loss", "Imbalance: 'loss' (class-weighted loss), 'sampler' "
        "(balanced sampling) or 'none'.", (), (TRAIN,), choices=("loss", "sampler", "none")),
    Key("stain_augment", "float", 0.0, "Training: strength (0-1) of lab-to-lab augmentation: "
        "haematoxylin/eosin/DAB stain colour and strength (colour deconvolution), glass tint, "
        "blur, noise and JPEG artefacts; 0 turns it off, 0.5 is a moderate lab-to-lab change.",
        (), (TRAIN,), 0.0, 1.0),
    Key("lr_schedule", "choice", "constant", "Training: learning rate over the epochs: "
        "'constant' (lr throughout) or 'cosine' (one warm-up epoch up to lr, then cosine decay "
        "to 0 at max_epochs).", (), (TRAIN,), choices=("constant", "cosine")),
    Key("calibrate", "bool", True, "Fit temperature scaling on the validation split (needs 30 "
        "or more validation images; maximum a posteriori with a N(0, 1) prior on log T, so no "
        "bounds are needed; the report says when it was skipped or set by the prior).", (),
        (TRAIN,)),
    Key("unfamiliar", "bool", True, "Training: store the features of the training images in "
        "the model file; deploy: a slide whose features lie far from all of them is "
        "'Undecided' (reason 'unfamiliar'), whatever its confidence.", (), BOTH),
    Key("adapt_bn", "bool", False, "Deploy: re-estimate BatchNorm statistics on the deploy "
        "images (up to 512) before predicting, to adapt to another lab's look; the model file "
        "is unchanged, the adapted statistics are saved in the results folder.", (), (DEPLOY,)),
    Key("tta", "bool", False, "Deploy: average predictions over flips and rotations.", (), (DEPLOY,)),
    Key("engine", "choice", "auto", "Deploy: inference engine: 'torch', 'openvino' (pip install "
        "\"thumbclf[openvino]\") or 'auto' (the fastest verified one installed).", (), (DEPLOY,),
        choices=("auto", "torch", "openvino")),
    Key("precision", "choice", "auto", "Deploy: 'fp32', 'bf16' (CPUs with AVX-512 BF16 or AMX, "
        "GPUs), 'int8' (OpenVINO on CPUs with VNNI or AMX) or 'auto'. A reduced precision is "
        "used only after passing the quality gate on labelled images.", (), (DEPLOY,),
        choices=("auto", "fp32", "bf16", "int8")),
    Key("verify_data", "path", None, "Deploy: labelled images (table or class folders) for the "
        "reduced-precision quality gate. Default: the validation split recorded in the model "
        "file, else the deploy's own labels.", (), (DEPLOY,)),
    Key("gradcam", "int", 2, "Grad-CAM overlays per class (and for Undecided); 0 turns them off.",
        (), BOTH, 0, 1000),
    Key("bootstrap", "int", 1000, "Bootstrap resamples for confidence intervals (0: none).",
        (), BOTH, 0, 100000),
    Key("device", "choice", "auto", "'auto' (CUDA if available), 'cpu' or 'cuda'.", (), ALL,
        choices=("auto", "cpu", "cuda")),
    Key("num_workers", "int", -1, "Image decoding worker processes (-1: sized to the machine).",
        (), ALL, -1, 256),
    Key("cache", "choice", "auto", "Decoded-image cache: 'memory', 'disk' (memory-mapped file) "
        "or 'auto' (memory when it fits).", (), TRAIN_PRETRAIN, choices=("auto", "memory", "disk")),
    Key("cache_dir", "path", None, "Folder of the on-disk caches (decoded images, slide "
        "thumbnails), reused across runs. Default: thumbclf-cache/ beside the results folder.", (),
        ALL),
    Key("max_failed_fraction", "float", 0.05, "Train: stop before training when more than this "
        "share of images cannot be read.", (), TRAIN_PRETRAIN, 0.0, 1.0),
    Key("max_image_pixels", "int", DEFAULT_MAX_PIXELS, "Refuse (non-JPEG) images with more "
        "pixels.", (), ALL, 1, 10**12),
    Key("slide_thumbnail_size", "int", DEFAULT_SLIDE_SIZE, "Long side in pixels of thumbnails "
        "rendered from whole-slide images.", (), ALL, 64, 16384),
    Key("export_thumbnails", "bool", False, "Write slide thumbnails as PNG to "
        "<results>/thumbnails/.", (), BOTH),
    Key("executor", "choice", "local", "Where the work runs: 'local' (this process and its "
        "workers) or 'ray' (deploy on Ray Data, cross-validation folds as parallel Ray tasks; "
        "needs pip install \"thumbclf[ray]\").", (), BOTH, choices=("local", "ray")),
    Key("ray_address", "str", None, "The Ray cluster to join with executor ray ('auto', or "
        "'ray://host:10001' / 'host:6379'). Default: start a Ray instance on this machine.", (),
        BOTH),
    Key("cpus_per_fold", "int", 0, "CPU threads that train one fold (0: every core of the "
        "machine). With executor ray, the CPUs each fold task reserves (0: 1 with a GPU, "
        "else the cluster's CPUs shared by the folds).", (), (TRAIN,), 0, 4096),
    Key("ssl_method", "choice", "byol", "Pretrain: the self-supervised method; 'byol' "
        "(bootstrap your own latent: no negative pairs, so small batches work).", (), (PRETRAIN,),
        choices=("byol",)),
    Key("projection_dim", "int", 256, "Pretrain: size of the projection (and prediction) output; "
        "the hidden layers are 4x as wide.", (), (PRETRAIN,), 8, 8192),
    Key("momentum", "float", 0.99, "Pretrain: starting momentum of the target network's moving "
        "average; it rises to 1 along a cosine over the run (0.99 suits runs of a few thousand "
        "steps, 0.996 much longer ones).", (), (PRETRAIN,), 0.0, 0.99999),
)

KEY_BY_NAME = {k.name: k for k in KEYS}
SPELLINGS = {spelling: k for k in KEYS for spelling in (k.name, *k.aliases)}
REQUIRED = {TRAIN: ("thumb_data",), DEPLOY: ("thumb_data", "model_path"),
            PRETRAIN: ("thumb_data",)}


def _d(name: str) -> Any:
    """The default of a key, as the key table declares it (the one place defaults live)."""
    return KEY_BY_NAME[name].default


@dataclass(frozen=True)
class Params:
    """Settings shared by both workflows."""

    source: Path
    output: Path
    thumb_data: Path
    target_labels: tuple[str, ...] | None = None
    model_path: tuple[Path, ...] = ()
    batch_size: int = _d("batch_size")
    prediction_threshold: float | None = None
    seed: int = _d("seed")
    model_name: str = _d("model_name")
    cm_sortlabels: tuple[str, ...] | None = None
    cm_xlabels: tuple[str, ...] | None = None
    cm_ylabels: tuple[str, ...] | None = None
    gradcam: int = _d("gradcam")
    bootstrap: int = _d("bootstrap")
    device: str = _d("device")
    num_workers: int = _d("num_workers")
    cache_dir: Path | None = None
    max_image_pixels: int = _d("max_image_pixels")
    slide_thumbnail_size: int = _d("slide_thumbnail_size")
    export_thumbnails: bool = _d("export_thumbnails")
    executor: str = _d("executor")
    ray_address: str | None = None
    given: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def cache_root(self) -> Path:
        """Caches (slide thumbnails, decoded images) shared by the runs beside this one."""
        return self.cache_dir or self.output.parent / layout.CACHE_FOLDER

    @property
    def slide_cache(self) -> Path:
        """Where rendered slide thumbnails are cached."""
        return self.cache_root / layout.SLIDE_THUMBNAILS


@dataclass(frozen=True)
class TrainParams(Params):
    """Settings of train_thumbclassifier.py."""

    target_accuracy: float | None = None
    max_epochs: int = _d("max_epochs")
    train_full: bool = _d("train_full")
    fold_number: int = _d("fold_number")
    lr: float = _d("lr")
    wd: float = _d("wd")
    patience: int = _d("patience")
    stop_epoch: int = _d("stop_epoch")
    freeze_ratio: float = _d("freeze_ratio")
    ssl: bool = _d("ssl")
    pretrained: bool | Path = _d("pretrained")
    val_fraction: float = _d("val_fraction")
    augment: bool = _d("augment")
    class_balance: str = _d("class_balance")
    calibrate: bool = _d("calibrate")
    stain_augment: float = _d("stain_augment")
    lr_schedule: str = _d("lr_schedule")
    unfamiliar: bool = _d("unfamiliar")
    cache: str = _d("cache")
    max_failed_fraction: float = _d("max_failed_fraction")
    cpus_per_fold: int = _d("cpus_per_fold")


@dataclass(frozen=True)
class DeployParams(Params):
    """Settings of deploy_thumbclassifier.py."""

    has_labels: bool = _d("has_labels")
    sort_thumbs: bool = _d("sort_thumbs")
    sort_slides: bool = _d("sort_slides")
    tta: bool = _d("tta")
    engine: str = _d("engine")
    precision: str = _d("precision")
    verify_data: Path | None = None
    unfamiliar: bool = _d("unfamiliar")
    adapt_bn: bool = _d("adapt_bn")


@dataclass(frozen=True)
class PretrainParams(Params):
    """Settings of pretrain_thumbclassifier.py (self-supervised; defaults differ from train's)."""

    max_epochs: int = 100
    lr: float = 1e-3
    wd: float = 1e-6
    pretrained: bool | Path = False
    cache: str = _d("cache")
    max_failed_fraction: float = _d("max_failed_fraction")
    ssl_method: str = _d("ssl_method")
    projection_dim: int = _d("projection_dim")
    momentum: float = _d("momentum")


PARAMS_CLASS = {TRAIN: TrainParams, DEPLOY: DeployParams, PRETRAIN: PretrainParams}
WORKFLOW_OF = {cls: name for name, cls in PARAMS_CLASS.items()}


# ---------------------------------------------------------------------------- reading files


MAX_EXPERIMENT_BYTES = 1_000_000  # experiment files are a few kB; refuse anything absurd


class _StrictLoader(yaml.SafeLoader):
    """YAML without aliases (no 'billion laughs') and with duplicate keys reported."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) "
                              "are not allowed in experiment files; write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise ConfigError(f"line {line}: a key must be a name, not a "
                                  f"{type(key).__name__}")
            if key in seen:
                raise ConfigError(f"{key}: given twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _json_pairs(text: str):
    def hook(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                lines = [i + 1 for i, line in enumerate(text.splitlines())
                         if re.search(r'"' + re.escape(key) + r'"\s*:', line)]
                where = f" (lines {lines[0]} and {lines[1]})" if len(lines) > 1 else ""
                raise ConfigError(f"{key}: given twice{where}; keep one")
            seen.add(key)
        return dict(pairs)
    return hook


def read_experiment_file(path: Path) -> dict[str, Any]:
    """Parse a YAML or JSON experiment file into a mapping; syntax errors name the line."""
    if not path.is_file():
        raise ConfigError(f"{path}: experiment file not found; check the path")
    suffix = path.suffix.lower()
    try:
        if path.stat().st_size > MAX_EXPERIMENT_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size:,} bytes is too large for an "
                              f"experiment file (at most {MAX_EXPERIMENT_BYTES:,}); is it the "
                              "right file?")
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the experiment file ({exc})") from exc
    try:
        data = parse_experiment_text(text, suffix)
    except ConfigError as exc:
        raise ConfigError(*(f"{path}: {p}" for p in exc.problems)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the experiment file must be a mapping of keys to values; "
                          f"got a {type(data).__name__}")
    return data


def parse_experiment_text(text: str, suffix: str) -> Any:
    """JSON (.json, .txt) or YAML (.yaml, .yml) text -> data; ConfigError without the file name."""
    if suffix in (".json", ".txt"):
        try:
            return json.loads(text, object_pairs_hook=_json_pairs(text))
        except RecursionError:
            raise ConfigError("nested too deeply to be an experiment file") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"line {exc.lineno}, column {exc.colno}: not valid JSON "
                              f"({exc.msg}); .json and .txt experiment files are JSON") from None
    if suffix in (".yaml", ".yml"):
        try:
            return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
        except RecursionError:
            raise ConfigError("nested too deeply to be an experiment file") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{where}not valid YAML ({problem})") from None
    raise ConfigError(f"unknown experiment file type {suffix!r}; use .yaml, .yml, .json or "
                      ".txt (JSON)")


def parse_override(text: str) -> tuple[str, Any]:
    """Split a ``--set KEY=VALUE`` argument; VALUE is read as YAML (numbers, booleans, lists)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. --set max_epochs=5")
    try:
        parsed = yaml.load(value, Loader=_StrictLoader) if value.strip() else None  # noqa: S506
    except (yaml.YAMLError, ConfigError):
        parsed = value
    return key.strip(), parsed


# ---------------------------------------------------------------------------- validation


def to_local_path(text: str, base: Path) -> Path:
    """A path string from a file (POSIX or Windows style), resolved against ``base``."""
    if os.sep == "/" and "\\" in text:
        text = PureWindowsPath(text).as_posix()
    path = Path(os.path.expanduser(text))
    return path if path.is_absolute() else (base / path)


def _check_number(key: Key, value: Any, kind: type) -> Any:
    what = "an integer" if kind is int else "a number"
    if isinstance(value, bool):
        raise ValueError(f"must be {what}, not true/false")
    if isinstance(value, str):  # the prototype used int()/float(); YAML 1.1 reads 1e-4 as text
        try:
            value = kind(value.strip())
        except ValueError:
            raise ValueError(f"must be {what}") from None
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ValueError("must be an integer")
    elif not isinstance(value, (int, float)):
        raise ValueError("must be a number")
    elif not math.isfinite(value):
        raise ValueError("must be a finite number")
    else:
        value = float(value)
    if (key.lo is not None and value < key.lo) or (key.hi is not None and value > key.hi):
        raise ValueError(f"must be between {key.lo:g} and {key.hi:g}")
    return value


BOOL_RULE = "must be true or false (or 1 or 0)"


def _check_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):  # the prototype's bool(0) and bool(1)
        return bool(value)
    if isinstance(value, str):
        raise ValueError(f"{BOOL_RULE}, not a string: the prototype read every non-empty "
                         "string as true, even \"False\", so thumbclf will not guess; write "
                         "true or false without quotes")
    raise ValueError(BOOL_RULE)


def _labels(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of labels")
    bad = [v for v in value if not isinstance(v, (str, int)) or isinstance(v, bool)]
    if bad:
        raise ValueError("must be a list of label strings")
    labels = tuple(str(v) for v in value)
    dupes = sorted({v for v in labels if labels.count(v) > 1})
    if dupes:
        raise ValueError(f"lists {', '.join(dupes)} more than once")
    return labels


def convert(key: Key, value: Any, base: Path) -> Any:
    """Check one value against its key's rule; return it in its typed form or raise ValueError."""
    if value is None:
        if key.default is None or key.rule == "threshold":
            return None
        raise ValueError("must not be empty")
    rule = key.rule
    if rule == "bool":
        return _check_bool(value)
    if rule == "int":
        return _check_number(key, value, int)
    if rule in ("float", "threshold"):
        return _check_number(key, value, float)
    if rule == "str":
        if not isinstance(value, str) or not value.strip():
            raise ValueError("must be a non-empty string")
        return value.strip()
    if rule == "model":
        if not isinstance(value, str) or not value.strip():
            raise ValueError("must be a non-empty string")
        from .models import arch_name, name_rule  # imports torch: only when a name is given

        try:
            arch_name(value)
        except ModelError:
            raise ValueError(f"is not a known backbone; {name_rule(value)}") from None
        return value.strip()
    if rule == "choice":
        if value not in key.choices:
            raise ValueError(f"must be one of {', '.join(key.choices)}")
        return value
    if rule == "labels":
        return _labels(value)
    if rule == "path":
        if not isinstance(value, str) or not value.strip():
            raise ValueError("must be a path (a string)")
        return to_local_path(value.strip(), base)
    if rule == "paths":
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, str) and v.strip() for v in items):
            raise ValueError("must be a path or a list of paths")
        return tuple(to_local_path(v.strip(), base) for v in items)
    if rule == "pretrained":
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        if isinstance(value, str) and value.strip():
            return to_local_path(value.strip(), base)
        raise ValueError("must be true, false or the path of a weights file")
    raise AssertionError(f"unknown rule {rule}")


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validate(raw: dict[str, Any], *, workflow: str, source: Path, output: Path | None = None,
             base: Path | None = None) -> Params:
    """Turn a raw mapping into the workflow's params; raise ConfigError listing every problem."""
    base = base if base is not None else source.parent
    problems: list[str] = []
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for spelling, value in raw.items():
        key = SPELLINGS.get(str(spelling))
        if key is None:
            close = difflib.get_close_matches(str(spelling), list(SPELLINGS), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else "; see experiments/template.yaml"
            problems.append(f"{spelling}: unknown key{hint}")
            continue
        if key.name in spelled:
            problems.append(f"{spelling}: given twice (also as {spelled[key.name]!r}); keep one")
            continue
        spelled[key.name] = str(spelling)
        if workflow not in key.workflows:
            continue  # e.g. sortThumbs in a training file: accepted, not used
        try:
            values[key.name] = convert(key, value, base)
        except ValueError as exc:
            problems.append(f"{spelling} {exc}; got {_show(value)}")
    for name in REQUIRED[workflow]:
        if values.get(name) in (None, ()):
            key = KEY_BY_NAME[name]
            spelling = key.aliases[0] if key.aliases else name
            problems.append(f"{spelling} is required ({key.doc.split(';')[0].rstrip('.')})")
    if workflow == TRAIN and values.get("ssl") and not values.get("model_path"):
        problems.append("modelAdr is required when SSL is true (the SSL checkpoint to start from)")
    if workflow == TRAIN and values.get("model_path") and len(values["model_path"]) > 1:
        problems.append("modelAdr must be one checkpoint for training with SSL; got a list")
    if values.get("executor") == "ray" and not _ray_installed():
        problems.append('executor: ray needs Ray, which is not installed; pip install '
                        '"thumbclf[ray]"')
    if values.get("ray_address") and values.get("executor") != "ray":
        problems.append("ray_address is only used with executor: ray; add executor: ray or "
                        "remove ray_address")
    if values.get("target_labels"):  # classes known now: check the confusion-matrix labels
        problems += cm_problems(values["target_labels"], values.get("cm_sortlabels"),
                                values.get("cm_xlabels"), values.get("cm_ylabels"))[1]
    if problems:
        raise ConfigError(*(f"{source}: {p}" for p in problems))
    cls = PARAMS_CLASS[workflow]
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in values.items() if k in names and v is not None}
    if output is None:
        output = source.parent / source.stem
    return cls(source=source, output=output, given=frozenset(values), **kwargs)


def _ray_installed() -> bool:
    """Whether Ray can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def cm_problems(classes: list[str] | tuple[str, ...], sortlabels, xlabels, ylabels
                ) -> tuple[tuple[list[str], list[str], list[str]], list[str]]:
    """Confusion-matrix row order and tick labels, plus every inconsistency found."""
    classes = list(classes)
    order = list(sortlabels) if sortlabels else classes
    unknown = [c for c in order if c not in classes]
    missing = [c for c in classes if c not in order]
    problems = []
    if unknown:
        verb = "is" if len(unknown) == 1 else "are"
        problems.append(f"cm_sortlabels names {', '.join(unknown)}, which {verb} no class "
                        f"(classes: {', '.join(classes)})")
    if missing:
        problems.append(f"cm_sortlabels leaves out {', '.join(missing)}; list every class once")
    xt = list(xlabels) if xlabels else order + [UNDECIDED]
    if len(xt) == len(order):
        xt = xt + [UNDECIDED]
    if len(xt) != len(order) + 1:
        problems.append(f"cm_xlabels must have {len(order)} labels (or {len(order) + 1} with "
                        f"Undecided); got {len(xt)}")
    yt = list(ylabels) if ylabels else order
    if len(yt) != len(order):
        problems.append(f"cm_ylabels must have {len(order)} labels, one per class; got {len(yt)}")
    return (order, xt, yt), problems


def cm_layout(classes, sortlabels, xlabels, ylabels, source: Any = "experiment file"
              ) -> tuple[list[str], list[str], list[str]]:
    """Row/column order and tick labels of the confusion matrix; ConfigError if inconsistent."""
    layout, problems = cm_problems(classes, sortlabels, xlabels, ylabels)
    if problems:
        raise ConfigError(*(f"{source}: {p}" for p in problems))
    return layout


def load_params(path: str | Path, *, workflow: str, overrides: list[str] = (),
                output: str | Path | None = None) -> Params:
    """Read, override and validate an experiment file for ``workflow`` ('train', 'deploy' or 'pretrain')."""
    source = Path(path).absolute()
    raw = read_experiment_file(source)
    for text in overrides:
        key, value = parse_override(text)
        canonical = SPELLINGS.get(key)
        if canonical is not None:  # an override replaces the key whatever its spelling
            for spelling in (canonical.name, *canonical.aliases):
                raw.pop(spelling, None)
        raw[key] = value
    out = Path(output).absolute() if output is not None else None
    return validate(raw, workflow=workflow, source=source, output=out)


def params_to_dict(params: Params) -> dict[str, Any]:
    """The resolved params as plain YAML-able values (paths as strings), for config.yaml."""
    out: dict[str, Any] = {}
    workflow = WORKFLOW_OF.get(type(params))
    for f in dataclasses.fields(params):
        if f.name == "given":
            continue
        key = KEY_BY_NAME.get(f.name)
        if workflow and key is not None and workflow not in key.workflows:
            continue  # e.g. gradcam in a pretraining run: not used there

        value = getattr(params, f.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = [str(v) for v in value]
        out[f.name] = value
    if "prediction_threshold" in out:
        out["prediction_threshold"] = params.prediction_threshold
    return out


def spelling(key: Key) -> str:
    """The spelling used in docs: the prototype's where it had one."""
    legacy = [a for a in key.aliases if a not in ("learning_rate", "weight_decay")]
    return legacy[0] if legacy else key.name


def template_text() -> str:
    """experiments/template.yaml: every key with its meaning and default (kept in sync by a test)."""
    lines = ["# thumbclf experiment file: every key, its meaning and its default.",
             "# Copy this file, delete what you don't need (absent keys take their defaults) and",
             "# set thumbData (and modelAdr for deploy). YAML (.yaml/.yml) or JSON (.json, or .txt",
             "# as the prototype wrote them). The prototype's spellings (thumbData, foldNumber, ...)",
             "# and the snake_case names (thumb_data, fold_number, ...) both work; give only one.",
             "# Relative paths start at this file's folder. Keys marked [train], [deploy] or",
             "# [pretrain] are used by those scripts only; the others accept and ignore them.",
             "# Booleans are true or false (or 1/0, as the prototype read them; never strings),",
             "# numbers may be quoted.", ""]
    for key in KEYS:
        name = spelling(key)
        where = "" if set(key.workflows) == set(ALL) else f"[{', '.join(key.workflows)}] "
        others = [a for a in (key.name, *key.aliases) if a != name]
        also = f" (also: {', '.join(others)})" if others else ""
        lines += ["# " + line for line in textwrap.wrap(where + key.doc + also, 90)]
        if key.name == "thumb_data":
            value = "data/labels.csv"
        elif key.name == "model_path":
            value = "null   # deploy: a training results folder, a model.pt, or a list of them"
        else:
            value = yaml.safe_dump(key.default, default_flow_style=True).strip()
            value = value.removesuffix("...").strip()
        lines += [f"{name}: {value}", ""]
    return "\n".join(lines)


STARTER_VALUES = {"thumb_data": "data/labels.csv   # a table (PATH, CLASSIFICATION) or a folder",
                  "model_path": "my_training   # a training results folder, a model.pt, or a list"}


def starter_text(workflow: str | None = None) -> str:
    """``thumbclf init``: the required keys set to examples, the others commented out with their
    defaults and meanings; ``workflow`` None serves both scripts."""
    import textwrap

    what = {TRAIN: "training", DEPLOY: "deployment", None: "training and deployment"}[workflow]
    needed = {TRAIN: ("thumb_data",), DEPLOY: ("thumb_data", "model_path"), None: ("thumb_data",)}
    lines = [f"# thumbclf experiment file for {what}, written by 'thumbclf init'.",
             "# Set the keys that are not commented out. Every other key takes the default shown;",
             "# remove the '# ' in front of one to change it. Relative paths start at this file's",
             "# folder. The prototype's spellings (thumbData, foldNumber, ...) and the snake_case",
             "# names (thumb_data, fold_number, ...) both work.", ""]
    for key in KEYS:
        if workflow is not None and workflow not in key.workflows:
            continue
        name = spelling(key)
        where = "" if workflow is not None or len(key.workflows) == 2 else f"[{key.workflows[0]}] "
        lines += ["# " + line for line in textwrap.wrap(where + key.doc, 90)]
        if key.name in needed[workflow]:
            lines += [f"{name}: {STARTER_VALUES[key.name]}", ""]
            continue
        if key.name == "model_path":
            value = STARTER_VALUES["model_path"]
        else:
            value = yaml.safe_dump(key.default, default_flow_style=True).strip()
            value = value.removesuffix("...").strip()
        lines += [f"# {name}: {value}", ""]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m thumbclf.config > experiments/template.yaml
    print(template_text(), end="")
