"""The deployment workflow: models -> streamed predictions (resumable) -> decisions ->
sorted copies -> evaluation."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pandas as pd
import torch


from thumbclf.config import DeployParams
from thumbclf.core import layout
from thumbclf.core import table as table_io
from thumbclf.core.decide import (MIN_SOURCE_SLIDES, POOLED, UNDECIDED, UNFAMILIAR_SOURCE,
                                  look_shift, threshold_in_force, unfamiliar_sources)
from thumbclf.core.errors import DataError, ModelError, OutputError
from thumbclf.core.files import atomic_csv, check_writable
from thumbclf.inputs import slides
from thumbclf.inputs.samples import SampleSet, check_input, discover
from thumbclf.nn import familiarity
from thumbclf.nn.training import configure_threads, pick_device
from thumbclf.nn.models import LoadedModel, load_model
from thumbclf.outputs import explain, tally
from thumbclf.outputs.confusion import cm_layout
from thumbclf.outputs.sorting import copy_all, sort_copies
from thumbclf.predict.ensemble import (ADAPT_IMAGES, MIN_ADAPT_IMAGES, adapt_batchnorm,
                                       adaptable_layers, check_adaptable)
from thumbclf.predict.engines import prepare_runners
from thumbclf.predict.stream import (
    timings,
    check_same_inputs,
    check_same_models,
    final_table,
    predict_stream,
)
from thumbclf.workflows.evaluate import evaluate_run, summarise_decisions
from thumbclf.workflows import shards
from thumbclf.workflows.run import inference_spec, write_config
from thumbclf.core.table import DECISION, ERROR, PATH

log = logging.getLogger(__name__)


def check_finished_training(folder: Path) -> None:
    """A training results folder given as modelAdr is not locked and finished (its report is
    written last); else ModelError naming what is missing."""
    if not layout.is_results_folder(folder):
        return  # a folder of model files, not a training run
    problems = []
    if (folder / layout.LOCK).is_file():
        problems.append(f"it is locked ({layout.LOCK}): a training runs in it or was interrupted")
    if not (folder / layout.REPORT).is_file():
        missing = [layout.REPORT]
        try:
            folds = sorted(set(table_io.read_csv(folder / layout.SPLITS, numeric=["fold"],
                                                 usecols=["fold"])["fold"].dropna().astype(int)))
        except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
            folds = []
        missing += [str(layout.fold_model(folder, k).relative_to(folder)) for k in folds
                    if not layout.fold_model(folder, k).is_file()]
        problems.append(f"the training did not finish ({', '.join(missing)} missing)")
    if problems:
        raise ModelError(f"{folder}: {'; '.join(problems)}; finish it with the training command "
                         "plus --resume, or set modelAdr to one of its model files")


def model_files(entries: tuple[Path, ...]) -> list[Path]:
    """Model files from modelAdr: files, or finished training results folders (their models)."""
    files: list[Path] = []
    for entry in entries:
        if entry.is_dir():
            check_finished_training(entry)
            found = layout.model_files_in(entry)
            if not found:
                raise ModelError(f"{entry}: no model.pt or fold_*/model.pt inside; point modelAdr "
                                 "to a model file or a training results folder")
            files += found
        elif entry.is_file():
            files.append(entry)
        else:
            raise ModelError(f"{entry}: model file not found (modelAdr); check the path")
    return files


def check_labels(sample_set: SampleSet, classes: tuple[str, ...], source: Path) -> None:
    """Labels that differ from the model's classes only in upper/lower case are refused (as
    training refuses them: counted as errors they would wreck the metrics); other unknown
    labels are counted as errors, with a warning."""
    unknown = sorted({s.label for s in sample_set.samples} - set(classes))
    folded = {c.casefold(): c for c in classes}
    pairs = [f"{u!r} (the model's {folded[u.casefold()]!r})" for u in unknown
             if u.casefold() in folded]
    if pairs:
        raise DataError(f"{source}: labels differ from the model's classes only in upper/lower "
                        f"case: {', '.join(pairs)}; write them exactly as the model's classes")
    if unknown:
        log.warning("labels the model does not know (counted as errors in the metrics): %s",
                    ", ".join(unknown))


def preflight(params: DeployParams) -> None:
    """What can be checked before the results folder is written: inputs, model files, cache."""
    check_input(params.thumb_data)
    check_writable(params.output, "results folder")
    model_files(params.model_path)
    check_writable(params.cache_root, "cache folder (cache_dir)")


def load_models(params: DeployParams) -> list[LoadedModel]:
    """Every model of the ensemble; they must agree on classes and preprocessing."""
    name = params.model_name if "model_name" in params.given else None
    loaded = [load_model(p, model_name=name, target_labels=params.target_labels,
                         max_pixels=params.max_image_pixels,
                         slide_size=params.slide_thumbnail_size
                         if "slide_thumbnail_size" in params.given else None,
                         slide_budget_s=params.slide_budget_s)
              for p in model_files(params.model_path)]
    first = loaded[0]
    for m in loaded[1:]:
        if m.classes != first.classes or m.prep != first.prep or m.norm != first.norm:
            raise ModelError(f"{m.path}: differs from {first.path} in classes or preprocessing; "
                             "an ensemble needs models of the same training")
    if len(loaded) > 1:
        log.info("ensemble of %d models (probabilities averaged): %s", len(loaded),
                 ", ".join(str(m.path) for m in loaded))
    return with_unfamiliar_rule(loaded, params.unfamiliar)


def with_unfamiliar_rule(models: list[LoadedModel], wanted: bool) -> list[LoadedModel]:
    """The models, with the unfamiliar-slide rule where asked for and every model has it."""
    if not wanted:
        log.info("unfamiliar-slide rule off (unfamiliar: false): Undecided by confidence only")
        return [dataclasses.replace(m, familiarity=None) for m in models]
    missing = [m for m in models if m.familiarity is None]
    if missing:
        who = (f"{missing[0].path} has" if len(missing) == 1
               else f"{len(missing)} of the {len(models)} model files have")
        causes = sorted({missing_rule_cause(m) for m in missing})
        log.warning("%s no training features (%s): Undecided by confidence only; unfamiliar "
                    "slides are not detected", who, "; ".join(causes))
        return [dataclasses.replace(m, familiarity=None) for m in models]
    return models


def missing_rule_cause(model: LoadedModel) -> str:
    """Why a model file has no unfamiliar-slide rule, as far as the file tells."""
    trained_with = model.meta.get("params") if isinstance(model.meta, dict) else None
    if model.legacy or not model.calibration or not isinstance(trained_with, dict):
        return "written by the prototype or before thumbclf 1.1"  # 1.1 added both
    if trained_with.get("unfamiliar") is False:
        return "trained with unfamiliar: false"
    return (f"the validation split had fewer than {familiarity.MIN_VALIDATION} images to set "
            "the rule's threshold")


def rule_note(models: list[LoadedModel]) -> str:
    """What the report says about the unfamiliar-slide rule."""
    rule = models[0].familiarity
    if rule is None:
        return ("Unfamiliar-slide rule: off (unfamiliar: false, or model files without training "
                "features); Undecided means low confidence only.")
    return familiarity.rule_sentence(rule)


def finished(folder: Path) -> bool:
    """A deploy whose every step is done: the report is written last."""
    return ((folder / layout.PREDICTIONS).is_file() and (folder / layout.REPORT).is_file()
            and not (folder / layout.PARTIAL).is_file())


def export_thumbnails(readable: list[tuple[Path, str, bool]], folder: Path, slide_size: int,
                      slide_cache: Path) -> int:
    """Slide thumbnails as thumbnails/<slide name>.png (names made safe and unique)."""
    taken: set[str] = set()
    jobs = [(slides.cached_thumbnail(path, slide_size, slide_cache),
             layout.unique_file(folder / layout.THUMBNAILS, layout.input_stem(path), ".png",
                                str(path), taken))
            for path, _, slide in readable if slide]
    made, kept = copy_all(jobs)
    return made + kept


def run(params: DeployParams, *, resume: bool = False, progress: bool = True,
        shard: shards.Shard | None = None) -> Path:
    """Deploy as the experiment file says; return the results folder (``shard``: the share's
    folder, with no copies and no report: ``thumbclf merge`` makes them)."""
    folder = shards.folder_of(params.output, shard)
    spec = inference_spec(params, progress=progress)
    if resume and finished(folder):
        raise OutputError(f"{folder}: this deploy finished already (predictions.csv and "
                          "report.html are complete); nothing to resume. Use --output NEW_FOLDER "
                          "for a new run")
    models = load_models(params)
    classes = models[0].classes
    table_io.check_class_names(classes, models[0].path)
    cm_layout(classes, params.cm_sortlabels, params.cm_xlabels, params.cm_ylabels, params.source)
    everything, sample_set = _inputs(params, folder, classes, shard)
    write_config(params, folder, resume)
    chosen = threshold_in_force(given=params.prediction_threshold,
                                stored=[m.threshold for m in models])
    threshold, why = chosen.value, chosen.reason
    log.info("%d images; model classes: %s; threshold %.3f (%s)", len(sample_set),
             ", ".join(classes), threshold, why)
    device = pick_device(params.device)
    is_slide = [slides.is_slide(s.path) for s in sample_set.samples]
    done = folder / layout.PREDICTIONS
    check_same_inputs(folder, sample_set, resume)
    check_same_models(folder, models, resume)
    choose = lambda head: prepare_runners(models, spec, head, device, threshold)  # noqa: E731
    if params.adapt_bn:
        check_adaptable(len(sample_set), params.thumb_data)
        configure_threads(device)
        models = adapt_batchnorm(models, sample_set, folder, device=device,
                                 slide_cache=params.slide_cache, resume=resume)
        choose = None  # PyTorch fp32: the engines' conversions are of the model files
    if resume and done.is_file() and not (folder / layout.PARTIAL).is_file():
        log.info("resuming after prediction: %s is complete; finishing the steps after it", done)
        table, _ = table_io.read(done, classes)
        engine_note = timings(folder).get("inference", "not recorded")
    else:
        partial, engine_note = predict_stream(
            models, sample_set, folder, spec=spec, threshold=threshold, device=device,
            resume=resume, choose=choose)
        table = final_table(sample_set, partial, classes, params.has_labels, threshold, is_slide,
                            read_from=(models[0].prep.slide_size, params.slide_cache))
        atomic_csv(table, done)
        partial.unlink(missing_ok=True)
    if shard is not None:  # the copies and the report are thumbclf merge's
        return shards.finish(folder, shard, len(table), params.output)
    table = judge_sources(table, done, params.unfamiliar_share, adapted=params.adapt_bn)
    failed = _say_decisions(table)
    _copies(params, folder, table, is_slide, models[0].prep.slide_size)
    slow = tally.slowest([Path(p) for p, s in zip(table[PATH], is_slide) if s],
                         models[0].prep.slide_size, params.slide_cache)
    _report(params, folder, table, models, sample_set, failed=failed, device=device,
            threshold=threshold, why=why, engine_note=engine_note,
            closing=tally.section(table, slow))
    log.info("%s", tally.closing_note(table, slow))
    review_hint(table, folder, sample_set.other_files)
    return folder


def _say_decisions(table: pd.DataFrame) -> int:
    """Log the decisions' counts; the number of unreadable inputs."""
    failed = int((table[ERROR] != "").sum())
    counts = table.loc[table[ERROR] == "", DECISION].value_counts()
    log.info("decisions: %s%s", ", ".join(f"{k} {v}" for k, v in counts.items()),
             f"; {failed} unreadable (see the error column)" if failed else "")
    return failed


ADAPTED_HINT = (". With adapt_bn this also happens when the deploy holds mostly one slide type "
                "(adaptation assumes a mix of types like training's): deploy again with "
                "adapt_bn: false to tell")


def judge_sources(table: pd.DataFrame, done: Path, share: float, *, adapted: bool = False
                  ) -> pd.DataFrame:
    """The predictions table after the source rule (decide.unfamiliar_sources), written back
    where it changed a decision. It needs every row, so it runs here, after prediction (and
    after thumbclf merge joins the shards), and again on --resume with the same result.
    ``adapted`` (adapt_bn): the warning says that adaptation to a deploy of mostly one slide
    type does this too (bench/realworld.py: 60 Resection slides, all decided without adapt_bn,
    all Undecided with it), and how to tell."""
    sources = table[table_io.SOURCE].tolist() if table_io.SOURCE in table else None
    decisions, reasons, verdicts = unfamiliar_sources(
        table[table_io.DECISION].tolist(), table[table_io.REASON].tolist(),
        table_io.signal(table, table_io.UNFAMILIARITY), sources, share)
    for v in verdicts:
        who = ("this deploy" if not v.name else f"the sources of fewer than {MIN_SOURCE_SLIDES} "
               "slides each, judged together" if v.name == POOLED else f"source {v.name!r}")
        log.warning("%s: %.0f%% of %d slides are unfamiliar (more than unfamiliar_share %.0f%%): "
                    "they come from a world the model was not trained on, so the others are "
                    "Undecided too (reason '%s')%s", who, 100 * v.unfamiliar, v.judged,
                    100 * share, UNFAMILIAR_SOURCE, ADAPTED_HINT if adapted else "")
    if decisions != table[table_io.DECISION].tolist():
        table = table.assign(**{table_io.DECISION: decisions, table_io.REASON: reasons})
        atomic_csv(table, done)
    return table


def _inputs(params: DeployParams, folder: Path, classes: tuple[str, ...],
            shard: shards.Shard | None) -> tuple[SampleSet, SampleSet]:
    """The deploy's inputs, checked, and this run's share of them (all without a shard). The
    quality gate checks a sample of all of them, so that every shard computes alike."""
    sample_set = discover(params.thumb_data, need_labels=params.has_labels,
                          target_labels=params.target_labels if params.has_labels else None,
                          exclude=(params.output, folder, params.cache_root))
    if params.has_labels:
        check_labels(sample_set, classes, params.thumb_data)
    if shard is None:
        return sample_set, sample_set
    return sample_set, shards.start(folder, sample_set, shard, params)


def adapt_advice(table: pd.DataFrame, adapted: bool, adaptable: bool = True) -> str | None:
    """Advice to try adapt_bn where the deploy as a whole looks unlike the training slides
    (decide.look_shift), adapt_bn was off, and it could run (``adaptable``: a model has
    BatchNorm layers to adapt; 32 images); None otherwise. Advice only: on the bench
    adaptation recovered such deploys of a mix of types and made an archive of one type all
    Undecided (bench/realworld.py), so the user compares."""
    shift = look_shift(table_io.signal(table, table_io.UNFAMILIAR_LOOK),
                       table[table_io.REASON].tolist(), familiarity.LOOK_MARGIN)
    if adapted or not adaptable or shift is None or shift.judged < MIN_ADAPT_IMAGES:
        return None
    return (f"This deploy looks unlike the training slides: {shift.beyond} of its {shift.judged} "
            "slides with tissue look less like them than 99% of the model's training and "
            "validation slides do (a few percent would): another stain, scanner or rendering. "
            "If it holds a mix of slide types from one lab, adapt_bn: true may recover "
            "decisions: deploy again with it into a new folder and compare (docs: how-to, Other "
            "labs).")


def review_hint(table: pd.DataFrame, folder: Path, other_files: int = 0) -> None:
    """The run's last lines: files of the input folder that were not images or slides, and,
    where slides are Undecided, the command that shows them."""
    if other_files:
        log.info("also left out: %d file%s in thumbData that are not images or slides",
                 other_files, "s" * (other_files != 1))
    undecided = int((table.loc[table[ERROR] == "", DECISION] == UNDECIDED).sum())
    if undecided:
        log.info("%d Undecided: work through them with: thumbclf review %s", undecided, folder)


def _copies(params: DeployParams, folder: Path, table: pd.DataFrame, is_slide: list[bool],
            slide_size: int) -> None:
    """Slide thumbnails (export_thumbnails) and sorted copies by decision (sortThumbs)."""
    slide_cache = params.slide_cache
    readable = [(Path(p), d, slide) for p, d, err, slide in
                zip(table[PATH], table[DECISION], table[ERROR], is_slide) if not err]
    if params.export_thumbnails and any(slide for _, _, slide in readable):
        n = export_thumbnails(readable, folder, slide_size, slide_cache)
        log.info("slide thumbnails: %d in %s", n, folder / layout.THUMBNAILS)
    elif params.export_thumbnails:  # pictures are thumbnails already
        log.info("export_thumbnails: no slide files among the inputs; nothing to export")
    if params.sort_thumbs:
        items = [(path, decision,
                  slides.cached_thumbnail(path, slide_size, slide_cache) if slide else None)
                 for path, decision, slide in readable]
        n = sort_copies(items, folder / layout.SORTED, with_slides=params.sort_slides)
        log.info("sorted copies of %d files into %s", n, folder / layout.SORTED)


def _report(params: DeployParams, folder: Path, table: pd.DataFrame, models: list[LoadedModel],
            sample_set: SampleSet, *, failed: int, device: torch.device, threshold: float,
            why: str, engine_note: str, closing: tuple[str, str]) -> None:
    """Grad-CAM, then metrics and the report (labelled) or the decisions' summary."""
    first, classes = models[0], models[0].classes
    spec = explain.GradcamSpec(first.prep, first.norm, first.arch, params.gradcam, device,
                               params.slide_cache)
    extra = explain.section(folder, table.drop(columns=["fold"], errors="ignore"),
                            {0: first.model}, list(classes), spec,
                            note="made with the first model of the ensemble" if len(models) > 1
                            else "made with the model")
    extra = [*extra, closing]  # every input accounted for: the report's last section
    notes = [f"Threshold {threshold:.3f} ({why}); "
             f"{len(models)} model{'s averaged' if len(models) > 1 else ''}"
             f"{'; test-time augmentation (8 flips/rotations)' if params.tta else ''}.",
             f"Inference: {engine_note}.", rule_note(models)]
    adaptable = any(adaptable_layers(m.model, m.meta) for m in models)
    advice = adapt_advice(table, params.adapt_bn, adaptable)
    if advice:
        log.info("%s", advice)
    if params.adapt_bn and adaptable:
        looks = any(m.familiarity is not None and m.familiarity.look is not None for m in models)
        notes.append("Adaptation: BatchNorm statistics re-estimated on up to "
                     f"{ADAPT_IMAGES} of these deploy images (adapt_bn), saved in "
                     f"{layout.ADAPTED_BN}/; the model files are unchanged."
                     + (" The look part of the unfamiliar-slide rule is adapted too: each look "
                        "statistic is moved by the difference between these images' median and "
                        "the training images'." if looks else ""))
    if params.has_labels:
        evaluate_run(folder, table[table[ERROR] == ""], classes=classes, params=params,
                     kind="deploy", sample_set=sample_set, split_df=None, failures=failed,
                     extra_sections=extra, notes=notes, advice=[advice] if advice else [])
    else:
        summarise_decisions(folder, table, classes=classes, params=params, failures=failed,
                            extra_sections=extra, notes=notes,
                            advice=[advice] if advice else [])

__all__ = ["run", "UNDECIDED"]
