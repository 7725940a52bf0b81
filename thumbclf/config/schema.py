"""Experiment files -> validated, frozen params objects.

One table (`KEYS`) lists every key: its canonical snake_case name, the spellings of the
original prototype, its type rule, default and meaning. Loading reports every problem of a
file at once, one line each, in the shape ``FILE: KEY must be ...; got VALUE``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thumbclf.core import layout
from thumbclf.inputs.images import DEFAULT_MAX_PIXELS, DEFAULT_SLIDE_BUDGET_S, DEFAULT_SLIDE_SIZE

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
    pretrain_default: Any = "same"  # pretraining's own default, where it differs

    def default_for(self, workflow: str) -> Any:
        """The default in ``workflow`` (pretraining has its own for a few keys)."""
        if workflow == PRETRAIN and self.pretrain_default != "same":
            return self.pretrain_default
        return self.default


# rule names: path, paths (one path or a list), int, float, bool, labels (list of str),
# choice, pretrained (bool or path), threshold (float or null), str, model (a backbone name).
# As the prototype read them: numbers may be quoted ("8", "1e-4"), booleans may be 1 or 0.
KEYS: tuple[Key, ...] = (
    Key("thumb_data", "path", None, "Table (.csv/.tsv/.xlsx with PATH, CLASSIFICATION[, PATIENT]) "
        "or folder of thumbnails/slides (one subfolder per class, or for pretrain any folder: no "
        "labels needed), or the URL of a DICOMweb service, study or series (deploy without "
        "labels; a table's PATH may hold such URLs too).", ("thumbData",), ALL),
    Key("corrections", "paths", None, "Training: reviewed labels (a table or a list of tables "
        "with PATH and CLASSIFICATION, as thumbclf review exports them): they replace the "
        "labels of the same slides (matched by resolved path) and add slides not in thumbData; "
        "'Undecided' changes nothing.", (), (TRAIN,)),
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
    Key("target_error", "threshold", None, "Choose the lowest threshold at which at most this "
        "share of decided validation slides is wrong, with 95% confidence (a Clopper-Pearson "
        "bound, on at least 20 decided slides), instead of prediction_threshold; e.g. 0.05.",
        (), (TRAIN,), 0.0, 1.0),
    Key("max_epochs", "int", 50, "Never train longer than this (pretrain: the epochs to run; "
        "default 100).", (), TRAIN_PRETRAIN, 1, 100000, pretrain_default=100),
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
    Key("sort_thumbs", "bool", False, "Deploy: copy each thumbnail into sorted/<decision>/. "
        "The copies lie side by side, without the input's subfolders; a name that two inputs "
        "share gets a short hash of its path (S1.svs, S1__a8113289.svs), and predictions.csv "
        "gives each input's path.", ("sortThumbs",), (DEPLOY,)),
    Key("sort_slides", "bool", False, "Deploy: also copy slide files into sorted/<decision>/. "
        "Privacy: the copy is the whole slide file, so an .svs, .ndpi or MIRAX slide keeps the "
        "label and macro images inside it (they can show the patient's name); keep sorted/ as "
        "private as the archive. A DICOM slide is copied without its LABEL and OVERVIEW "
        "instances.", ("sortSlides",), (DEPLOY,)),
    Key("train_full", "bool", False, "Train one final model on all data (minus a validation "
        "split) instead of cross-validation.", ("trainFull",), (TRAIN,)),
    Key("fold_number", "int", 3, "Number of cross-validation folds.", ("foldNumber",), (TRAIN,), 2, 100),
    Key("lr", "float", 1e-4, "Adam learning rate (pretrain: peak of the warm-up/cosine "
        "schedule; default 1e-3).", ("learning_rate",), TRAIN_PRETRAIN, 0.0, 10.0,
        pretrain_default=1e-3),
    Key("wd", "float", 1e-4, "Adam weight decay (pretrain: default 1e-6).", ("weight_decay",),
        TRAIN_PRETRAIN, 0.0, 10.0, pretrain_default=1e-6),
    Key("patience", "int", 10, "Early stopping: epochs without a better validation loss.",
        (), (TRAIN,), 1, 100000),
    Key("stop_epoch", "int", 20, "Early stopping never stops before this epoch.", ("stopEpoch",),
        (TRAIN,), 0, 100000),
    Key("freeze_ratio", "float", 0.5, "Fraction of the network's blocks frozen, in order (never "
        "the head): its top-level children, where one holding over 80% of the parameters is "
        "split into its own children (ResNet: conv1 ... layer4, fc; VGG: the layers of "
        "features; ViT: its encoder layers). Default 0.5 when training starts from trained "
        "weights (ImageNet, a weights file or SSL), else 0 (frozen at their random "
        "initialisation, layers would stay random).",
        ("freezeRatio",), (TRAIN,), 0.0, 1.0),
    Key("ssl", "bool", False, "Initialise the backbone from the self-supervised checkpoint at "
        "modelAdr.", ("SSL",), (TRAIN,)),
    Key("pretrained", "pretrained", True, "true: ImageNet weights (torchvision download/cache); "
        "false: from scratch; or a path to a local weights file (pretrain: the starting point; "
        "default false).", (), TRAIN_PRETRAIN, pretrain_default=False),
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
    Key("unfamiliar_share", "float", 0.5, "Deploy: when more than this share of one source's "
        "slides is unfamiliar (the SOURCE column of the input table, else the whole deploy; "
        "judged on 20 or more slides), the source does not fit the model and its other slides "
        "are 'Undecided' too (reason 'unfamiliar source'); 1 turns this off.", (), (DEPLOY,),
        0.0, 1.0),
    Key("adapt_bn", "bool", False, "Deploy: re-estimate BatchNorm statistics on the deploy "
        "images (up to 512) before predicting, to adapt to another lab's look; the model file "
        "is unchanged, the adapted statistics are saved in the results folder. A deploy that "
        "looks unlike the training slides says so and suggests it. It assumes a mix of slide "
        "types, as in training: on a deploy of one type it makes most slides unfamiliar.", (),
        (DEPLOY,)),
    Key("tta", "bool", False, "Deploy: average predictions over flips and rotations.", (), (DEPLOY,)),
    Key("engine", "choice", "auto", "Deploy: inference engine: 'torch', 'openvino' (pip install "
        "\"thumbclf[openvino]\") or 'auto' (the fastest verified one installed).", (), (DEPLOY,),
        choices=("auto", "torch", "openvino")),
    Key("precision", "choice", "auto", "Deploy: 'fp32', 'bf16' (CPUs with AVX-512 BF16 or AMX, "
        "GPUs), 'int8' (OpenVINO on CPUs with VNNI or AMX) or 'auto'. A reduced precision is "
        "used only after passing the quality gate on labelled images.", (), (DEPLOY,),
        choices=("auto", "fp32", "bf16", "int8")),
    Key("verify_data", "path", None, "Deploy: labelled images (table or class folders) for the "
        "reduced-precision quality gate. Default: the validation splits of the models' training "
        "run (splits.csv beside the model files).", (), (DEPLOY,)),
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
    Key("slide_budget_s", "float", DEFAULT_SLIDE_BUDGET_S, "Seconds one slide may take to read; "
        "a slower one gets the status 'too large' and the run goes on.", (), ALL, 0.1, 86400.0),
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
        "else the cluster's CPUs shared by the folds, at most its largest node's; more than that "
        "node has is refused).", (), (TRAIN,), 0, 4096),
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


def _d(name: str, workflow: str = TRAIN) -> Any:
    """The default of a key, as the key table declares it (the one place defaults live)."""
    return KEY_BY_NAME[name].default_for(workflow)


@dataclass(frozen=True)
class Params:
    """Settings shared by both workflows."""

    source: Path
    output: Path
    thumb_data: Path | None = None  # None: no images yet (the API's load_model)
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
    slide_budget_s: float = _d("slide_budget_s")
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
    target_error: float | None = None
    corrections: tuple[Path, ...] = ()
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
    unfamiliar_share: float = _d("unfamiliar_share", DEPLOY)
    adapt_bn: bool = _d("adapt_bn")


@dataclass(frozen=True)
class PretrainParams(Params):
    """Settings of pretrain_thumbclassifier.py (self-supervised; defaults differ from train's)."""

    max_epochs: int = _d("max_epochs", PRETRAIN)
    lr: float = _d("lr", PRETRAIN)
    wd: float = _d("wd", PRETRAIN)
    pretrained: bool | Path = _d("pretrained", PRETRAIN)
    cache: str = _d("cache")
    max_failed_fraction: float = _d("max_failed_fraction")
    ssl_method: str = _d("ssl_method")
    projection_dim: int = _d("projection_dim")
    momentum: float = _d("momentum")


PARAMS_CLASS = {TRAIN: TrainParams, DEPLOY: DeployParams, PRETRAIN: PretrainParams}
WORKFLOW_OF = {cls: name for name, cls in PARAMS_CLASS.items()}


# ---------------------------------------------------------------------------- reading files


# ---------------------------------------------------------------------------- validation


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
            value = layout.web_url(value) or str(value)  # a DICOMweb URL as written
        elif isinstance(value, tuple):
            value = [str(v) for v in value]
        out[f.name] = value
    if "prediction_threshold" in out:
        out["prediction_threshold"] = params.prediction_threshold
    return out


