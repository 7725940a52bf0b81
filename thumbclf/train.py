"""The training workflow, top to bottom: samples -> cache -> splits -> folds -> predictions ->
evaluation."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import cache, splits as splitting
from .config import TrainParams, cm_layout, params_to_dict
from .decide import decide, threshold_for_accuracy
from .engine import EarlyStopping, fit, fit_temperature, pick_device, predict_logits, softmax
from .errors import DataError
from .images import Preprocessing
from .models import (ARCHS, arch_name, build_model, freeze, imagenet_normalisation, load_ssl,
                     read_ssl, read_weights, save_model)
from .results import atomic_csv, atomic_text, atomic_torch_save, write_config
from .samples import SampleSet, check_class_names, check_class_sizes, discover
from .data import training_batches

log = logging.getLogger(__name__)


def load_images(params, sample_set: SampleSet, prep: Preprocessing, folder: Path, *,
                mode: str, max_failed: float | None, quiet: bool):
    """Decode every image once; report failures; drop them (training) or keep them (deploy)."""
    cache_dir = params.cache_root
    paths = [s.path for s in sample_set.samples]
    decoded = cache.build(paths, prep, mode=mode, cache_dir=cache_dir,
                          slide_cache=cache_dir / "slides", workers=params.num_workers,
                          quiet=quiet)
    n_fail = len(decoded.errors)
    if n_fail:
        for i, err in sorted(decoded.errors.items()):
            s = sample_set.samples[i]
            log.debug("unreadable: %s", f"row {s.row}: {err}" if s.row else err)
        first = sample_set.samples[min(decoded.errors)]
        log.warning("%d of %d images could not be read and are left out (first: %s%s); the "
                    "full list is in run.log", n_fail, len(paths),
                    f"row {first.row}: " if first.row else "", decoded.errors[min(decoded.errors)])
        if max_failed is not None and n_fail / len(paths) > max_failed:
            raise DataError(f"{sample_set.source}: {n_fail} of {len(paths)} images "
                            f"({n_fail / len(paths):.0%}) cannot be read, more than "
                            f"max_failed_fraction ({max_failed:.0%}); fix the inputs (see "
                            f"{folder / 'run.log'}) or raise max_failed_fraction")
    log.info("images ready in %.1fs", decoded.seconds)
    return decoded


def report_rare_classes(counts: dict[str, int], balance: str) -> list[str]:
    """Warn about classes with under a third of the average class size; return their names."""
    mean = sum(counts.values()) / max(len(counts), 1)
    rare = [c for c, n in counts.items() if n < mean / 3]
    if rare:
        how = {"loss": "the loss weights them up (class_balance: loss)",
               "sampler": "they are drawn more often (class_balance: sampler)",
               "none": "nothing compensates (class_balance: none)"}[balance]
        log.warning("rare classes: %s; %s. Check their per-class sensitivity in the report",
                    ", ".join(f"{c} ({counts[c]} images, {counts[c] / sum(counts.values()):.0%})"
                              for c in rare), how)
    return rare


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse class frequency weights, mean 1 over the images (balanced)."""
    counts = np.bincount(y, minlength=n_classes).astype(float)
    w = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)
    return w


def configure_threads(device: torch.device) -> None:
    """Intra-op threads = usable cores on the CPU (decoding is done before training)."""
    if device.type == "cpu":
        torch.set_num_threads(cache.default_workers(-1))


def train_fold(params: TrainParams, *, decoded, y: np.ndarray, classes: tuple[str, ...],
               train_pos: np.ndarray, val_pos: np.ndarray, fold: int, device: torch.device,
               prep: Preprocessing, quiet: bool, checkpoint: Path | None = None):
    """Build, freeze, fit, calibrate one model; return it with its history and metadata."""
    torch.manual_seed(params.seed * 1000 + fold)
    rng = np.random.default_rng([params.seed, fold])
    gen = torch.Generator().manual_seed(params.seed * 1000 + fold + 7)
    arch = arch_name(params.model_name)
    model = build_model(arch, len(classes), params.pretrained if not params.ssl else False)
    if params.ssl:
        load_ssl(model, params.model_path[0], arch)
    frozen = freeze(model, arch, params.freeze_ratio)
    log.info("frozen (freezeRatio %.2f): %s", params.freeze_ratio, ", ".join(frozen) or "nothing")
    model = model.to(device).to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=params.lr, weight_decay=params.wd)
    y_train = y[train_pos]
    weights = None
    loss_weights = None
    cw = class_weights(y_train, len(classes))
    if params.class_balance == "loss":
        loss_weights = torch.tensor(cw, dtype=torch.float32, device=device)
    elif params.class_balance == "sampler":
        weights = cw[y_train]
    criterion = nn.CrossEntropyLoss(weight=loss_weights)
    val_criterion = nn.CrossEntropyLoss(weight=loss_weights.cpu() if loss_weights is not None else None)
    norm = imagenet_normalisation()
    bs = params.batch_size
    n_batches = math.ceil(len(train_pos) / bs)

    def train_batches():
        return training_batches(decoded, train_pos, y, batch_size=bs, rng=rng, weights=weights)

    def val_batches():
        return training_batches(decoded, val_pos, y, batch_size=bs * 2, rng=rng, shuffle=False,
                                drop_single=False)

    bn_images = min(256, max(64, len(train_pos) // 10))  # a forward pass over these per epoch

    def bn_batches():  # unaugmented training images, shuffled, for BatchNorm statistics
        sample = np.random.default_rng([params.seed, fold, 1]).permutation(train_pos)[:bn_images]
        return training_batches(decoded, sample, y, batch_size=bs, rng=np.random.default_rng(0),
                                shuffle=False, drop_single=True)

    stopper = EarlyStopping(params.patience, params.stop_epoch, params.max_epochs)

    def save_checkpoint(state: dict) -> None:  # every epoch, with the random generators
        state.update(np_rng=json.dumps(rng.bit_generator.state), torch_gen=gen.get_state(),
                     torch_rng=torch.get_rng_state(), fold=fold)
        atomic_torch_save(state, checkpoint)

    resume_state = None
    if checkpoint is not None and checkpoint.is_file():
        resume_state = read_weights(checkpoint, "checkpoint of the interrupted fold")
        rng.bit_generator.state = json.loads(resume_state["np_rng"])
        gen.set_state(resume_state["torch_gen"])
        torch.set_rng_state(resume_state["torch_rng"])
    result = fit(model, train_batches=train_batches, val_batches=val_batches,
                 n_train_batches=n_batches, bn_batches=bn_batches, optimizer=optimizer,
                 criterion=criterion, val_criterion=val_criterion, stopper=stopper, norm=norm,
                 device=device, gen=gen if params.augment else None, quiet=quiet,
                 label=f"fold {fold}: " if fold else "",
                 on_epoch=save_checkpoint if checkpoint is not None else None,
                 resume=resume_state)
    val_logits = result.val_logits if result.val_logits is not None else np.zeros((0, len(classes)))
    y_val = y[val_pos]
    temperature = fit_temperature(val_logits, y_val) if params.calibrate else 1.0
    threshold = params.threshold
    if params.target_accuracy is not None:
        chosen = threshold_for_accuracy(softmax(val_logits, temperature), y_val,
                                        params.target_accuracy)
        if chosen is None:
            log.warning("target_accuracy %.3f is not reached on the validation data at any "
                        "threshold; every case would be Undecided (threshold 1.0)",
                        params.target_accuracy)
            chosen = 1.0
        threshold = chosen
        log.info("threshold %.4f reaches accuracy %.3f on the validation data", threshold,
                 params.target_accuracy)
    meta = {"fold": fold, "best_epoch": result.best_epoch, "frozen": frozen,
            "params": {k: v for k, v in params_to_dict(params).items()
                       if isinstance(v, (int, float, str, bool, list, type(None)))}}
    return model, result, norm, temperature, threshold, meta


def prediction_table(sample_set: SampleSet, positions: np.ndarray, probs: np.ndarray,
                     classes: tuple[str, ...], threshold: float, fold: int | None) -> pd.DataFrame:
    """PATH, CLASSIFICATION[, PATIENT], fold, one column per class, model_prediction."""
    samples = [sample_set.samples[i] for i in positions]
    df = pd.DataFrame({"PATH": [str(s.path) for s in samples],
                       "CLASSIFICATION": [s.label for s in samples]})
    if sample_set.has_patients:
        df["PATIENT"] = [s.patient or str(s.path) for s in samples]
    if fold is not None:
        df["fold"] = fold
    for j, cls in enumerate(classes):
        df[cls] = probs[:, j]
    df["model_prediction"] = decide(probs, classes, threshold)
    df["threshold"] = threshold
    return df


def explain_section(folder: Path, table: pd.DataFrame, classes, params, prep: Preprocessing,
                    device: torch.device) -> list[tuple[str, str]]:
    """Grad-CAM overlays with each image's own fold model, as a report section."""
    from . import report
    from .explain import write_gallery
    from .models import load_model

    if params.gradcam <= 0:
        return []
    files = {0 if params.train_full else int(p.parent.name[5:]): p
             for p in ([folder / "model.pt"] if params.train_full else folder.glob("fold_*/model.pt"))}
    models = {(None if fold == 0 else fold): load_model(f).model for fold, f in files.items()}
    fig = write_gallery(models, table, list(classes), prep=prep, norm=imagenet_normalisation(),
                        arch=arch_name(params.model_name), per_class=params.gradcam, out=folder,
                        device=device)
    if fig is None:
        return []
    return [("Grad-CAM", report.img(fig, "Grad-CAM") + "<p class=muted>Overlays for the most "
             "confident slides of each class and the least certain Undecided ones, each with its "
             "own fold's model; one PNG per slide in gradcam/&lt;decision&gt;/.</p>")]


def run(params: TrainParams, *, resume: bool = False, quiet: bool = False) -> Path:
    """Train as the experiment file says; return the results folder."""
    from .evaluate import evaluate_run

    folder = params.output
    started = time.perf_counter()
    sample_set = discover(params.thumb_data, need_labels=True, target_labels=params.target_labels)
    check_class_names(sample_set.classes, params.thumb_data)
    cm_layout(sample_set.classes, params.cm_sortlabels, params.cm_xlabels, params.cm_ylabels,
              params.source)  # a bad confusion-matrix option fails now, not after training
    if len(sample_set.classes) < 2:
        raise DataError(f"{params.thumb_data}: found only the class {sample_set.classes[0]!r}; "
                        "training needs at least two classes")
    check_class_sizes(sample_set, 2 if params.train_full else params.fold_number)
    write_config(params, folder, resume)
    log.info("%d images in %d classes: %s", len(sample_set), len(sample_set.classes),
             ", ".join(f"{k} {v}" for k, v in sample_set.counts().items()))
    report_rare_classes(sample_set.counts(), params.class_balance)
    device = pick_device(params.device)
    configure_threads(device)
    log.info("device: %s%s", device, f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
    arch = arch_name(params.model_name)
    if params.ssl:  # a checkpoint for another architecture or input size fails now, not per fold
        read_ssl(params.model_path[0], arch)
    prep = Preprocessing(size=ARCHS[arch].input_size, max_pixels=params.max_image_pixels,
                         slide_size=params.slide_thumbnail_size)
    decoded = load_images(params, sample_set, prep, folder, mode=params.cache,
                          max_failed=params.max_failed_fraction, quiet=quiet)
    ok = decoded.ok
    if not ok.all():
        keep = np.flatnonzero(ok)
        sample_set = SampleSet(tuple(sample_set.samples[i] for i in keep), sample_set.classes,
                               sample_set.has_patients, sample_set.source)
        decoded.rows = decoded.rows[keep]
        decoded.errors = {}
        check_class_sizes(sample_set, 2 if params.train_full else params.fold_number)
    classes = sample_set.classes
    y = np.array([classes.index(s.label) for s in sample_set.samples])
    paths = [str(s.path) for s in sample_set.samples]
    patients = ([s.patient or str(s.path) for s in sample_set.samples]
                if sample_set.has_patients else None)

    split_file = folder / "splits.csv"
    if resume and split_file.is_file():
        split_df = splitting.load(split_file, paths)
        log.info("resuming with the splits in %s", split_file)
    else:
        split_df = splitting.make_splits([s.label for s in sample_set.samples], patients,
                                         folds=params.fold_number, full=params.train_full,
                                         val_fraction=params.val_fraction, seed=params.seed)
        splitting.save(split_df, paths, [s.label for s in sample_set.samples], patients, split_file)

    folds = [0] if params.train_full else list(range(1, params.fold_number + 1))
    tables = []
    for fold in folds:
        fdir = folder / ("full" if fold == 0 else f"fold_{fold}")
        pred_file = fdir / ("val_predictions.csv" if fold == 0 else "predictions.csv")
        model_file = folder / "model.pt" if fold == 0 else fdir / "model.pt"
        if resume and pred_file.is_file() and model_file.is_file():
            log.info("%s: finished earlier; skipped", fdir.name)
            tables.append(pd.read_csv(pred_file, dtype={"PATH": str, "CLASSIFICATION": str}))
            continue
        train_pos = splitting.positions(split_df, fold, "train")
        val_pos = splitting.positions(split_df, fold, "val")
        log.info("%s: %d train, %d validation%s", "full training" if fold == 0 else f"fold {fold}",
                 len(train_pos), len(val_pos),
                 "" if fold == 0 else f", {len(splitting.positions(split_df, fold, 'test'))} test")
        model, result, norm, temperature, threshold, meta = train_fold(
            params, decoded=decoded, y=y, classes=classes, train_pos=train_pos, val_pos=val_pos,
            fold=fold, device=device, prep=prep, quiet=quiet,
            checkpoint=fdir / "checkpoint.pt")
        atomic_csv(pd.DataFrame(result.history), fdir / "history.csv")
        eval_pos = val_pos if fold == 0 else splitting.positions(split_df, fold, "test")
        logits, _ = predict_logits(model, training_batches(
            decoded, eval_pos, y, batch_size=params.batch_size * 2, rng=np.random.default_rng(0),
            shuffle=False, drop_single=False), norm=norm, device=device)
        probs = softmax(logits, temperature)
        table = prediction_table(sample_set, eval_pos, probs, classes, threshold,
                                 None if fold == 0 else fold)
        save_model(model_file, model, arch=arch, classes=classes, prep=prep, norm=norm,
                   threshold=threshold, temperature=temperature, meta=meta)
        atomic_csv(table, pred_file)  # written last: its presence marks the fold finished
        (fdir / "checkpoint.pt").unlink(missing_ok=True)
        log.info("%s: best epoch %d, temperature %.2f, model %s", fdir.name, result.best_epoch,
                 temperature, model_file)
        tables.append(table)

    if params.train_full:
        log.info("final model: %s", folder / "model.pt")
        table, kind = tables[0], "validation"
    else:
        table, kind = pd.concat(tables, ignore_index=True), "cross-validation"
        atomic_csv(table, folder / "predictions.csv")
    extra = explain_section(folder, table, classes, params, prep, device)
    notes = []
    if params.target_accuracy is not None:
        per = table.groupby("fold")["threshold"].first() if "fold" in table else table["threshold"].iloc[:1]
        notes.append(f"Thresholds chosen to reach {params.target_accuracy:.1%} accuracy on each "
                     "validation split (target_accuracy): "
                     + ", ".join(f"{'fold ' + str(k) + ' ' if 'fold' in table else ''}{v:.3f}"
                                 for k, v in per.items()) + "; the coverage they give is below.")
    evaluate_run(folder, table, classes=classes, params=params, kind=kind,
                 sample_set=sample_set, split_df=split_df, extra_sections=extra, notes=notes)
    timings = {"decode_seconds": round(decoded.seconds, 3),
               "total_seconds": round(time.perf_counter() - started, 3), "images": len(sample_set)}
    atomic_text(json.dumps(timings, indent=1), folder / "timings.json")
    log.info("done in %.0fs; results in %s", time.perf_counter() - started, folder)
    return folder
