"""The training workflow, top to bottom: samples -> cache -> splits -> folds -> evaluation."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from thumbclf.config import TrainParams, params_to_dict
from thumbclf.core import layout, machine
from thumbclf.core import table as table_io
from thumbclf.core.backbones import arch_name
from thumbclf.core.decide import decide_with_reasons, threshold_in_force
from thumbclf.core.errors import DataError
from thumbclf.core.seeds import Streams
from thumbclf.core.files import atomic_csv, atomic_text, atomic_torch_save
from thumbclf.inputs import splits as splitting
from thumbclf.inputs.corrections import apply_corrections, read_corrections
from thumbclf.inputs.images import Preprocessing
from thumbclf.inputs.samples import SampleSet, check_class_sizes, discover, input_columns
from thumbclf.nn import familiarity, look
from thumbclf.nn.data import IMAGENET, training_batches
from thumbclf.nn.calibration import MIN_CALIBRATION_IMAGES, Calibration, fit_temperature
from thumbclf.nn.training import (EarlyStopping, FitResult, FitSpec, configure_threads, fit,
                                predict_logits, softmax)
from thumbclf.nn.models import (LoadedModel, build_model, head_names, input_size, load_model,
                                load_ssl, read_weights, save_model)
from thumbclf.nn.freeze import freeze, warn_untrained
from thumbclf.outputs import explain
from thumbclf.outputs.evaluate import threshold_notes
from thumbclf.outputs.confusion import cm_layout
from thumbclf.nn import distributed
from thumbclf.predict.execution import executor_for
from thumbclf.workflows.evaluate import evaluate_run
from thumbclf.workflows.prepare import load_images, preflight_common
from thumbclf.workflows.run import executor_spec, write_config

log = logging.getLogger(__name__)


@dataclass
class FoldResult:
    """One trained fold (fold 0: full training), kept in memory for evaluation and Grad-CAM."""

    fold: int
    model: nn.Module
    history: pd.DataFrame
    table: pd.DataFrame
    calibration: Calibration | None = None
    unfamiliar_rule: bool = False  # the model file has the unfamiliar-slide rule


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
    """Balanced class weights (scikit-learn's), 0 for a class absent from ``y``."""
    present = np.unique(y)
    w = np.zeros(n_classes)
    w[present] = compute_class_weight("balanced", classes=present, y=y)
    return w


def preflight(params: TrainParams) -> None:
    """What can be checked before the results folder is written: the backbone, its pretrained
    or SSL weights (fetched now where they must be downloaded), the cache folder."""
    preflight_common(params)
    if params.ssl:  # a checkpoint for another architecture or input size fails now
        arch = arch_name(params.model_name)
        load_ssl(build_model(arch, 2, False), params.model_path[0], arch)


def _new_model(params: TrainParams, arch: str, n_classes: int, device: torch.device
               ) -> tuple[nn.Module, list[str]]:
    model = build_model(arch, n_classes, params.pretrained if not params.ssl else False)
    if params.ssl:
        load_ssl(model, params.model_path[0], arch)
    frozen = freeze(model, arch, params.freeze_ratio)
    log.info("frozen (freezeRatio %.2f): %s", params.freeze_ratio, ", ".join(frozen) or "nothing")
    return model.to(device).to(memory_format=torch.channels_last), frozen


def restore_generators(state: dict, gen: torch.Generator) -> None:
    """Each rank continues its own random streams (under torchrun every rank augments its
    images with its own generator); a checkpoint without them (thumbclf 1.1, or another
    number of processes) gives every rank rank 0's, and the run says so."""
    own = state.get("rank_generators")
    if own is not None and len(own) == distributed.world_size():
        gen_state, torch_state = own[distributed.rank()]
    else:
        gen_state, torch_state = state["torch_gen"], state["torch_rng"]
        if distributed.active():
            log.warning("the checkpoint holds the random generators of one process only: "
                        "every rank continues with rank 0's augmentation, so the model differs "
                        "from an uninterrupted run")
    gen.set_state(gen_state)
    torch.set_rng_state(torch_state)


def _fit_fold(params: TrainParams, model: nn.Module, trainer: nn.Module, *, decoded,
              y: np.ndarray, n_classes: int,
              train_pos: np.ndarray, val_pos: np.ndarray, fold: int, device: torch.device,
              progress: bool, checkpoint: Path, rng: np.random.Generator,
              gen: torch.Generator) -> FitResult:
    """Fit with early stopping, checkpointing every epoch (with the random generators)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=params.lr, weight_decay=params.wd)
    y_train = y[train_pos]
    cw = class_weights(y_train, n_classes)
    loss_weights = (torch.tensor(cw, dtype=torch.float32)
                    if params.class_balance == "loss" else None)
    sampling = cw[y_train] if params.class_balance == "sampler" else None
    bs = params.batch_size
    bn_images = min(256, max(64, len(train_pos) // 10))  # a forward pass over these per epoch
    bn_sample = Streams(params.seed, fold).bn_sample().permutation(train_pos)[:bn_images]

    def train_batches():
        return training_batches(decoded, train_pos, y, batch_size=bs, rng=rng, weights=sampling,
                                shard=distributed.shard if distributed.active() else None)

    def val_batches():
        return training_batches(decoded, val_pos, y, batch_size=bs * 2, rng=None, drop_single=False)

    def bn_batches():  # unaugmented training images, for BatchNorm statistics
        return training_batches(decoded, bn_sample, y, batch_size=bs, rng=None, drop_single=True)

    def save_checkpoint(state: dict) -> None:
        own = distributed.gather([gen.get_state(), torch.get_rng_state()])  # each rank's own
        if not distributed.is_main():
            return  # rank 0 writes; every rank holds the same weights
        state.update(np_rng=json.dumps(rng.bit_generator.state), torch_gen=gen.get_state(),
                     torch_rng=torch.get_rng_state(), rank_generators=own, fold=fold)
        atomic_torch_save(state, checkpoint)

    resume_state = None
    if checkpoint.is_file():
        resume_state = read_weights(checkpoint, "checkpoint of the interrupted fold")
        rng.bit_generator.state = json.loads(resume_state["np_rng"])
        restore_generators(resume_state, gen)
    spec = FitSpec(
        train_batches=train_batches, val_batches=val_batches,
        n_train_batches=math.ceil(len(train_pos) / bs), bn_batches=bn_batches,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(weight=None if loss_weights is None
                                      else loss_weights.to(device)),
        val_criterion=nn.CrossEntropyLoss(weight=loss_weights),
        stopper=EarlyStopping(params.patience, params.stop_epoch, params.max_epochs),
        norm=IMAGENET, device=device, gen=gen if params.augment else None, trainer=trainer,
        reduce=distributed.mean if distributed.active() else None,
        stain=params.stain_augment if params.augment else 0.0, lr_schedule=params.lr_schedule,
        features_head=head_names(model)[0] if params.unfamiliar else None,  # the rule's bank
        bank_size=familiarity.BANK_SIZE, seed=Streams(params.seed, fold).feature_bank)
    return fit(model, spec, progress=progress, label=f"fold {fold}: " if fold else "",
               on_epoch=save_checkpoint, resume=resume_state)


def run_fold(params: TrainParams, folder: Path, *, fold: int, sample_set: SampleSet, decoded,
             y: np.ndarray, split_df: pd.DataFrame, prep: Preprocessing, arch: str,
             device: torch.device, progress: bool) -> FoldResult:
    """Train, calibrate and evaluate one fold; write its model, history and predictions."""
    classes = sample_set.classes
    train_pos = splitting.positions(split_df, fold, "train")
    val_pos = splitting.positions(split_df, fold, "val")
    eval_pos = val_pos if fold == 0 else splitting.positions(split_df, fold, "test")
    log.info("%s: %d train, %d validation%s", layout.fold_label(fold), len(train_pos),
             len(val_pos), "" if fold == 0 else f", {len(eval_pos)} test")
    fdir = layout.fold_dir(folder, fold)
    streams = Streams(params.seed, fold, distributed.rank())
    torch.manual_seed(streams.init)  # before the model: its initial weights
    rng, gen = streams.batches(), streams.augmentation()
    model, frozen = _new_model(params, arch, len(classes), device)
    model, trainer = distributed.wrap(model, device)
    result = _fit_fold(params, model, trainer, decoded=decoded, y=y, n_classes=len(classes),
                       train_pos=train_pos, val_pos=val_pos, fold=fold, device=device,
                       progress=progress, checkpoint=fdir / layout.CHECKPOINT, rng=rng, gen=gen)
    calibration, threshold = _calibrate(params, result, y[val_pos], len(classes))
    temperature = calibration.temperature
    history = pd.DataFrame(result.history)
    if not distributed.is_main():  # the same model as rank 0's; rank 0 writes it
        return FoldResult(fold, model, history, pd.DataFrame())
    atomic_csv(history, fdir / layout.HISTORY)
    table, rule = _fold_table(params, model, decoded, y, sample_set, fold=fold,
                              train_pos=train_pos, val_pos=val_pos, eval_pos=eval_pos,
                              temperature=temperature, threshold=threshold.value, device=device,
                              fitted=result)
    meta = {"fold": fold, "best_epoch": result.best_epoch, "frozen": frozen,
            "params": {k: v for k, v in params_to_dict(params).items()
                       if isinstance(v, (int, float, str, bool, list, type(None)))}}
    model_file = layout.fold_model(folder, fold)
    save_model(model_file, LoadedModel(model, arch, classes, prep, IMAGENET,
                                       threshold=threshold.value, temperature=temperature,
                                       meta=meta, familiarity=rule,
                                       calibration=calibration.to_file()))
    atomic_csv(table, layout.fold_predictions(folder, fold))  # last: marks the fold finished
    (fdir / layout.CHECKPOINT).unlink(missing_ok=True)
    log.info("%s: best epoch %d, %s; model %s", fdir.name, result.best_epoch,
             calibration.describe(), model_file)
    return FoldResult(fold, model, history, table, calibration, rule is not None)


def _calibrate(params: TrainParams, result: FitResult, val_y: np.ndarray, n_classes: int):
    """The fold's temperature (calibrate) and the threshold in force on its validation split."""
    val_logits = result.val_logits if result.val_logits is not None else np.zeros((0, n_classes))
    calibration = (fit_temperature(val_logits, val_y) if params.calibrate
                   else Calibration(1.0, "off", len(val_y)))
    threshold = threshold_in_force(given=params.prediction_threshold,
                                   target_accuracy=params.target_accuracy,
                                   target_error=params.target_error,
                                   val_probs=softmax(val_logits, calibration.temperature),
                                   val_y=val_y)
    return calibration, threshold


def _fold_table(params: TrainParams, model: nn.Module, decoded, y: np.ndarray,
                sample_set: SampleSet, *, fold: int, train_pos, val_pos, eval_pos,
                temperature: float, threshold: float, device: torch.device, fitted: FitResult):
    """The fold's predictions table on its evaluation images, and its unfamiliar-slide rule
    (fitted on training features and looks, thresholded on validation ones; None when off).

    What the best epoch computed anyway is reused (``fitted``): its validation logits and
    features (evaluation mode, the same weights: the same numbers a new pass would give) and
    its training passes' features for the bank; a pass only where those are missing."""
    classes, patients = sample_set.classes, sample_set.patients()

    def outputs(positions):  # logits and features (unaugmented, evaluation mode), in order
        batches = training_batches(decoded, positions, y, batch_size=params.batch_size * 2,
                                   rng=None, drop_single=False)
        out, _ = predict_logits(familiarity.WithFeatures(model, head_names(model)[0]), batches,
                                norm=IMAGENET, device=device)
        return familiarity.split(out, len(classes))

    rule, val = None, (fitted.val_logits, fitted.val_features)
    have_val = val[0] is not None and (val[1] is not None or not params.unfamiliar)
    logits, eval_features = val if fold == 0 and have_val else outputs(eval_pos)
    eval_looks, eval_tissue = look.of_images(decoded.get, eval_pos)
    if params.unfamiliar:
        val_features = (eval_features if fold == 0 else fitted.val_features
                        if have_val else outputs(val_pos)[1])
        bank_pos = familiarity.bank_positions(train_pos, Streams(params.seed, fold).bank)
        bank = fitted.train_features if fitted.train_features is not None else outputs(bank_pos)[1]
        train_looks, held_out = familiarity.training_looks(  # as training augmented them
            decoded.get, bank_pos, seed=Streams(params.seed, fold).looks, augmented=params.augment,
            stain=params.stain_augment if params.augment else 0.0)
        val_looks = eval_looks if fold == 0 else look.of_images(decoded.get, val_pos)[0]
        rule = familiarity.fit(bank, val_features, train_looks, val_looks, held_out,
                               groups=patients and [patients[i] for i in bank_pos])
    probs = softmax(logits, temperature)
    signals = familiarity.ensemble_signals([rule], [eval_features], eval_looks, eval_tissue)
    decisions, reasons = decide_with_reasons(probs, classes, threshold, signals.get(
        table_io.UNFAMILIARITY), signals[table_io.TISSUE])
    inputs = input_columns([sample_set.samples[i] for i in eval_pos], labels=True,
                           patients=sample_set.has_patients)
    table = table_io.build(inputs, probs, classes, decisions, threshold=threshold,
                           reasons=reasons, signals=signals, fold=fold)
    return table, rule


def training_notes(results: list[FoldResult], params: TrainParams) -> list[str]:
    """What the report says about calibration and the unfamiliar-slide rule of each model."""
    cals = [r for r in results if r.calibration is not None]
    if len(cals) == 1:
        notes = [f"Calibration: {cals[0].calibration.describe()}."]
    else:
        notes = [f"Calibration (temperature scaling on each validation split; it needs "
                 f"{MIN_CALIBRATION_IMAGES} images): " + "; ".join(
                     f"{layout.fold_label(r.fold)} {r.calibration.short()}" for r in cals)
                 + ". T below 1 sharpens an under-confident model's probabilities."] if cals else []
    if params.unfamiliar:
        off = [r for r in results if not r.unfamiliar_rule]
        if off:
            notes.append(f"Unfamiliar-slide rule off for {len(off)} of {len(results)} models: "
                         f"their validation split has fewer than {familiarity.MIN_VALIDATION} "
                         "images to choose its threshold; their Undecided means low confidence "
                         "only.")
        else:
            notes.append(familiarity.rule_sentence())
    return notes


def _run_fold(*, fold: int, device: torch.device, params: TrainParams, **shared) -> FoldResult:
    """run_fold as an executor calls it (keyword arguments only)."""
    return run_fold(params, shared.pop("folder"), fold=fold, device=device, **shared)


def finished_fold(folder: Path, fold: int) -> FoldResult | None:
    """A fold finished by an earlier, interrupted run (its predictions are written last)."""
    pred_file, model_file = layout.fold_predictions(folder, fold), layout.fold_model(folder, fold)
    if not (pred_file.is_file() and model_file.is_file()):
        return None
    log.info("%s: finished earlier; skipped", layout.fold_dir(folder, fold).name)
    history = table_io.read_csv(layout.fold_dir(folder, fold) / layout.HISTORY, numeric=True)
    loaded = load_model(model_file)
    return FoldResult(fold, loaded.model, history, table_io.read_fold(pred_file),
                      Calibration.from_file(loaded.calibration), loaded.familiarity is not None)


def _decoded_without_failures(decoded, sample_set: SampleSet, params: TrainParams):
    """Leave out the images that could not be read (training needs every image it uses)."""
    if decoded.ok.all():
        return decoded, sample_set
    keep = np.flatnonzero(decoded.ok)
    sample_set = SampleSet(tuple(sample_set.samples[i] for i in keep), sample_set.classes,
                           sample_set.has_patients, sample_set.source)
    decoded.rows = decoded.rows[keep]
    decoded.errors = {}
    check_class_sizes(sample_set, 2 if params.train_full else params.fold_number)
    return decoded, sample_set


def _splits(params: TrainParams, folder: Path, sample_set: SampleSet, resume: bool) -> pd.DataFrame:
    """The folds (written once, reused on resume)."""
    paths = [str(s.path) for s in sample_set.samples]
    labels = [s.label for s in sample_set.samples]
    patients = sample_set.patients()
    split_file = folder / layout.SPLITS
    if resume and split_file.is_file():
        log.info("resuming with the splits in %s", split_file)
        return splitting.load(split_file, paths, labels)
    split_df = splitting.make_splits(labels, patients, folds=params.fold_number,
                                     full=params.train_full, val_fraction=params.val_fraction,
                                     seed=params.seed)
    if distributed.is_main():
        splitting.save(split_df, paths, labels, patients, split_file)
    return split_df


def with_corrections(sample_set: SampleSet, params: TrainParams) -> tuple[SampleSet, str]:
    """The samples with the corrections tables' labels, and a sentence saying what changed."""
    if not params.corrections:
        return sample_set, ""
    found = read_corrections(params.corrections)
    sample_set, applied = apply_corrections(sample_set, found, target_labels=params.target_labels,
                                            tables=len(params.corrections),
                                            min_images=2 if params.train_full else params.fold_number)
    log.info("%s", applied.sentence())
    return sample_set, applied.sentence()


def _inputs(params: TrainParams, folder: Path, resume: bool) -> tuple[SampleSet, str]:
    """The labelled images (with the corrections), checked before anything is trained; the
    settings saved. Also the sentence saying what the corrections changed (or '')."""
    sample_set = discover(params.thumb_data, need_labels=True, target_labels=params.target_labels,
                          exclude=(folder, params.cache_root))
    sample_set, corrected = with_corrections(sample_set, params)
    table_io.check_class_names(sample_set.classes, params.thumb_data)
    cm_layout(sample_set.classes, params.cm_sortlabels, params.cm_xlabels, params.cm_ylabels,
              params.source)  # a bad confusion-matrix option fails now, not after training
    if len(sample_set.classes) < 2:
        raise DataError(f"{params.thumb_data}: found only the class {sample_set.classes[0]!r}; "
                        "training needs at least two classes")
    check_class_sizes(sample_set, 2 if params.train_full else params.fold_number)
    if distributed.is_main():
        write_config(params, folder, resume)
    log.info("%d images in %d classes: %s", len(sample_set), len(sample_set.classes),
             ", ".join(f"{k} {v}" for k, v in sample_set.counts().items()))
    report_rare_classes(sample_set.counts(), params.class_balance)
    return sample_set, corrected


def _device(params: TrainParams) -> torch.device:
    """This rank's device, with its threads set."""
    device = distributed.init(params.device)  # pick_device; this rank's GPU under torchrun
    configure_threads(device, params.cpus_per_fold or (distributed.local_threads(machine.cores())
                                                       if distributed.active() else 0))
    log.info("device: %s%s", device,
             f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
    return device


def run(params: TrainParams, *, resume: bool = False, progress: bool = True) -> Path:
    """Train as the experiment file says; return the results folder."""
    folder = params.output
    started = time.perf_counter()
    warn_untrained(params.freeze_ratio, trained=params.pretrained is not False or params.ssl)
    sample_set, corrected = _inputs(params, folder, resume)
    device = _device(params)
    arch = arch_name(params.model_name)
    prep = Preprocessing(size=input_size(arch), max_pixels=params.max_image_pixels,
                         slide_size=params.slide_thumbnail_size,
                         slide_budget_s=params.slide_budget_s)
    decoded = load_images(params, sample_set, prep, folder, mode=params.cache,
                          max_failed=params.max_failed_fraction, progress=progress)
    decoded, sample_set = _decoded_without_failures(decoded, sample_set, params)
    y = np.array([sample_set.classes.index(s.label) for s in sample_set.samples])
    split_df = _splits(params, folder, sample_set, resume)

    folds = [0] if params.train_full else list(range(1, params.fold_number + 1))
    done = {fold: r for fold in folds if resume and (r := finished_fold(folder, fold))}
    todo = [fold for fold in folds if fold not in done]
    shared = dict(params=params, folder=folder, sample_set=sample_set, decoded=decoded, y=y,
                  split_df=split_df, prep=prep, arch=arch, progress=progress)
    with executor_for(executor_spec(params), progress=progress) as ex:  # here one after another, or Ray tasks
        done.update(zip(todo, ex.run_folds(_run_fold, todo, shared, device=device)))
    results = [done[fold] for fold in folds]
    if not distributed.is_main():
        return folder  # rank 0 pools, evaluates and reports
    _evaluate(params, folder, results, sample_set, split_df, prep=prep, arch=arch, device=device,
              notes=[corrected] if corrected else [])
    timings = {"decode_seconds": round(decoded.seconds, 3),
               "total_seconds": round(time.perf_counter() - started, 3), "images": len(sample_set),
               "memory_kept": machine.memory_kept()}
    atomic_text(json.dumps(timings, indent=1), folder / layout.TIMINGS)
    log.info("done in %.0fs; results in %s", time.perf_counter() - started, folder)
    return folder


def _evaluate(params: TrainParams, folder: Path, results: list[FoldResult],
              sample_set: SampleSet, split_df: pd.DataFrame, *, prep: Preprocessing, arch: str,
              device: torch.device, notes: list[str]) -> None:
    """Pool the folds' predictions; Grad-CAM, metrics, plots and the report."""
    classes = sample_set.classes
    if params.train_full:
        log.info("final model: %s", layout.fold_model(folder, 0))
        table, kind = results[0].table, "validation"
    else:
        table, kind = pd.concat([r.table for r in results], ignore_index=True), "cross-validation"
        atomic_csv(table, folder / layout.PREDICTIONS)
    spec = explain.GradcamSpec(prep, IMAGENET, arch, params.gradcam, device, params.slide_cache)
    extra = explain.section(folder, table, {r.fold: r.model for r in results}, list(classes),
                            spec, note="each with its own fold's model")
    notes = [*notes, *threshold_notes(table, params.target_accuracy, params.target_error),
             *training_notes(results, params)]
    evaluate_run(folder, table, classes=classes, params=params, kind=kind,
                 sample_set=sample_set, split_df=split_df, extra_sections=extra, notes=notes,
                 histories={layout.fold_label(r.fold): r.history for r in results})
