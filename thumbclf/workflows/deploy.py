"""The deployment workflow: models -> streamed predictions (resumable) -> decisions ->
sorted copies -> evaluation."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from thumbclf.config import DeployParams
from thumbclf.core import layout
from thumbclf.core import table as table_io
from thumbclf.core.decide import UNDECIDED, decide_with_reasons, threshold_in_force
from thumbclf.core.errors import (
    DataError,
    ImageReadError,
    ModelError,
    OutputError,
    clean,
)
from thumbclf.core.files import (
    append_whole,
    atomic_csv,
    atomic_text,
    check_writable,
    repair_tail,
)
from thumbclf.inputs import slides
from thumbclf.inputs import splits as splitting
from thumbclf.inputs.decode import load_array
from thumbclf.inputs.samples import SampleSet, check_class_names, check_input, discover
from thumbclf.nn import familiarity
from thumbclf.nn.data import to_input
from thumbclf.nn.engine import configure_threads, pick_device
from thumbclf.nn.models import LoadedModel, load_model
from thumbclf.outputs import explain
from thumbclf.outputs.confusion import cm_layout
from thumbclf.outputs.sorting import copy_all, sort_copies
from thumbclf.predict import inference
from thumbclf.predict.ensemble import ADAPT_IMAGES, adapt_batchnorm, exact_runners
from thumbclf.predict.execution import executor_for
from thumbclf.workflows.evaluate import evaluate_run, summarise_decisions
from thumbclf.workflows.run import write_config

log = logging.getLogger(__name__)


def model_files(entries: tuple[Path, ...]) -> list[Path]:
    """Model files from modelAdr: files, or training results folders (their fold models)."""
    files: list[Path] = []
    for entry in entries:
        if entry.is_dir():
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
                         if "slide_thumbnail_size" in params.given else None)
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
        log.warning("%s no training features (written before thumbclf 1.1, trained with "
                    "unfamiliar: false, or with a validation split too small to set the rule's "
                    "threshold): Undecided by confidence only; unfamiliar slides are not "
                    "detected", who)
        return [dataclasses.replace(m, familiarity=None) for m in models]
    return models


def rule_note(models: list[LoadedModel]) -> str:
    """What the report says about the unfamiliar-slide rule."""
    rule = models[0].familiarity
    if rule is None:
        return ("Unfamiliar-slide rule: off (unfamiliar: false, or model files without training "
                "features); Undecided means low confidence only.")
    return familiarity.rule_sentence(rule)


def prepare_runners(models: list[LoadedModel], params: DeployParams, sample_set: SampleSet,
                    device: torch.device, threshold: float) -> tuple[list[inference.Runner], str]:
    """The inference engine and precision of each model (engine, precision keys), verified."""
    first = models[0]
    slide_cache = params.slide_cache
    pairs = verification_pairs(models, params)
    decoded: list = []

    def verify():  # decoded once, for every model and candidate
        if not decoded:
            arrays, labels = [], []
            for path, label in pairs:
                try:
                    arrays.append(load_array(path, first.prep, slide_cache=slide_cache))
                    labels.append(first.classes.index(label))
                except ImageReadError:
                    continue
            decoded.append(None if len(arrays) < inference.MIN_VERIFY_IMAGES else
                           (to_input(torch.from_numpy(np.stack(arrays)), first.norm,
                                     torch.device("cpu"), channels_last=False), np.array(labels)))
        return decoded[0]

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

    verify_id = hashlib.sha1("\n".join(f"{p}|{lab}" for p, lab in pairs).encode(
        "utf-8", "surrogateescape")).hexdigest()
    runners, notes = [], []
    for m in models:
        runner, why = inference.choose(
            m.runnable(), model_file=m.path, size=m.prep.size, channels_last=not m.legacy,
            device=device, engine=params.engine, precision=params.precision,
            cache_dir=params.cache_root, verify=verify, verify_id=verify_id,
            calibration=calibration, temperature=m.temperature, classes=m.classes,
            threshold=threshold)
        runners.append(runner)
        notes.append(why)
    why = notes[0] if len(set(notes)) == 1 else "; ".join(
        f"{m.path.name}: {n}" for m, n in zip(models, notes))
    log.info("inference: %s", why)
    return runners, why


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


def _timings(folder: Path) -> dict:
    try:
        return json.loads((folder / "timings.json").read_text())
    except (OSError, ValueError):
        return {}


def peak_memory_mb() -> float | None:
    """This process's peak resident memory (Linux: VmHWM, which exec resets), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _done_positions(partial: Path) -> set[int]:
    dropped = repair_tail(partial)
    if dropped:
        log.warning("%s: dropped a torn last row (%d bytes, from an interrupted write); its "
                    "images are predicted again", partial, dropped)
    if partial.is_file() and partial.stat().st_size == 0:  # not even the header was written
        partial.unlink()
    if not partial.is_file():
        return set()
    try:
        df = pd.read_csv(partial, usecols=["position"])
    except (ValueError, pd.errors.EmptyDataError, pd.errors.ParserError):
        raise OutputError(f"{partial}: unreadable ({partial.stat().st_size} bytes); delete it to "
                          "predict every image again, or start a new run with --output") from None
    return set(int(p) for p in df["position"])


def _csv_rows(rows: list[list]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode("utf-8")


def check_same_inputs(folder: Path, sample_set: SampleSet, resume: bool) -> None:
    """The inputs of a deploy, written once (inputs.csv); a resume must have the same ones, or
    earlier rows would be given to other files."""
    paths = [str(s.path) for s in sample_set.samples]
    listed = folder / layout.INPUTS
    if resume and listed.is_file():
        before = pd.read_csv(listed, dtype={"PATH": str}, keep_default_na=False)["PATH"].tolist()
        if before != paths:
            raise DataError(f"{sample_set.source}: the inputs differ from those of the "
                            f"interrupted run ({len(before)} then, {len(paths)} now, listed in "
                            f"{listed}); restore them, or start a new run with --output")
        return
    atomic_csv(pd.DataFrame({"position": range(len(paths)), "PATH": paths}), listed)


def predict_stream(models, sample_set: SampleSet, folder: Path, *, params: DeployParams,
                   threshold: float, device: torch.device, quiet: bool, resume: bool,
                   choose=None) -> tuple[Path, str]:
    """Predict every sample not yet in the partial file; append rows batch by batch; return
    the partial file and which engine computed.

    Each batch's rows are appended whole (one synced write), so a crash or a full disk never
    tears a row; --resume predicts only what is missing. ``choose()`` gives the runners (and
    why); by default PyTorch fp32.
    """
    partial = folder / layout.PARTIAL
    classes = models[0].classes
    if partial.is_file() and not resume:
        raise OutputError(f"{partial}: left by an interrupted run; continue it with --resume")
    done = _done_positions(partial)
    todo = [i for i in range(len(sample_set)) if i not in done]
    if done:
        log.info("resuming: %d images predicted earlier, %d to go", len(done), len(todo))
    if not todo:
        return partial, _timings(folder).get("inference", "not recorded")
    configure_threads(device)
    header = ["position", *classes, table_io.DECISION, table_io.REASON, table_io.UNFAMILIARITY,
              table_io.ERROR]
    new_file = not partial.is_file() or partial.stat().st_size == 0
    if not new_file:
        check_partial_header(partial, header)
    n_err = 0
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="predicting", unit="img", disable=quiet)
    with executor_for(params, quiet=quiet) as ex:
        if ex.name == "local":
            runners, engine_note = (choose() if choose is not None
                                    else (exact_runners(models, device), "PyTorch fp32"))
        else:  # each Ray actor computes with PyTorch fp32
            runners, engine_note = None, f"PyTorch fp32 on {ex.name} actors"
        paths = [sample_set.samples[i].path for i in todo]
        # closing: an interruption stops the executor's pipeline before the executor ends
        with contextlib.closing(ex.predict(models, todo, paths, device=device,
                                           slide_cache=params.slide_cache,
                                           runners=runners)) as batches:
            for pos, probs, unfamiliarity, errors in batches:
                decisions, reasons = decide_with_reasons(probs, classes, threshold, unfamiliarity)
                rows = [header] if new_file else []
                new_file = False
                for j, p in enumerate(pos.tolist()):
                    if errors[j]:
                        n_err += 1
                        log.debug("unreadable: %s", errors[j])
                        rows.append([p, *([""] * len(classes)), "", "", "", clean(errors[j])])
                    else:
                        rows.append([p, *(f"{v:.6g}" for v in probs[j]), decisions[j], reasons[j],
                                     "" if unfamiliarity is None else f"{unfamiliarity[j]:.4g}",
                                     ""])
                append_whole(partial, _csv_rows(rows))
                bar.update(len(pos))
        how = ex.describe()
    bar.close()
    secs = time.perf_counter() - start
    atomic_text(json.dumps({"predict_seconds": round(secs, 3), "images": len(todo),
                            **how, "threads": torch.get_num_threads(),
                            "peak_memory_mb": peak_memory_mb(), "inference": engine_note},
                           indent=1),
                folder / "timings.json")
    log.info("predicted %d images in %.1fs (%.1f images/s)%s", len(todo), secs,
             len(todo) / secs if secs else 0, f"; {n_err} could not be read" if n_err else "")
    return partial, engine_note


def check_partial_header(partial: Path, header: list[str]) -> None:
    """An interrupted run's partial file has the columns this version writes."""
    with open(partial, newline="", encoding="utf-8") as f:
        found = next(csv.reader(f), [])
    if found != header:
        raise OutputError(f"{partial}: written with other columns ({', '.join(found[:12])}) by "
                          "another thumbclf version or model; start a new run with --output "
                          "(or delete the file to predict every image again)")


def final_table(sample_set: SampleSet, partial: Path, classes: tuple[str, ...],
                has_labels: bool, threshold: float, is_slide: list[bool]) -> pd.DataFrame:
    """The predictions table in input order, with slide properties where there are slides."""
    rows = pd.read_csv(partial, dtype={table_io.DECISION: str, table_io.REASON: str,
                                       table_io.ERROR: str}, keep_default_na=False,
                       na_values={c: [""] for c in (*classes, table_io.UNFAMILIARITY)})
    rows = rows.drop_duplicates("position", keep="last").set_index("position").sort_index()
    rows = rows.reindex(range(len(sample_set)))
    errors = rows["error"].fillna("").to_numpy()
    unfamiliarity = rows[table_io.UNFAMILIARITY].to_numpy(dtype=float)
    slide_properties = [slides.properties(s.path) if slide and not err else None
                        for s, slide, err in zip(sample_set.samples, is_slide, errors)]
    return table_io.build(sample_set.samples, rows[list(classes)].to_numpy(dtype=float), classes,
                          rows["model_prediction"].fillna("").to_numpy(), threshold=threshold,
                          reasons=rows[table_io.REASON].fillna("").to_numpy(),
                          unfamiliarity=None if np.isnan(unfamiliarity).all() else unfamiliarity,
                          labels=has_labels, patients=sample_set.has_patients,
                          rows=any(s.row is not None for s in sample_set.samples),
                          errors=errors, slide_properties=slide_properties)


def finished(folder: Path) -> bool:
    """A deploy whose every step is done: the report is written last."""
    return ((folder / layout.PREDICTIONS).is_file() and (folder / layout.REPORT).is_file()
            and not (folder / layout.PARTIAL).is_file())


def export_thumbnails(readable: list[tuple[Path, str, bool]], folder: Path, slide_size: int,
                      slide_cache: Path) -> int:
    """Slide thumbnails as thumbnails/<slide name>.png (names made safe and unique)."""
    taken: set[str] = set()
    jobs = [(slides.cached_thumbnail(path, slide_size, slide_cache),
             layout.unique_file(folder / "thumbnails", path.stem, ".png", str(path), taken))
            for path, _, slide in readable if slide]
    made, kept = copy_all(jobs)
    return made + kept


def run(params: DeployParams, *, resume: bool = False, quiet: bool = False) -> Path:
    """Deploy as the experiment file says; return the results folder."""
    folder = params.output
    if resume and finished(folder):
        raise OutputError(f"{folder}: this deploy finished already (predictions.csv and "
                          "report.html are complete); nothing to resume. Use --output NEW_FOLDER "
                          "for a new run")
    models = load_models(params)
    classes = models[0].classes
    check_class_names(classes, models[0].path)
    cm_layout(classes, params.cm_sortlabels, params.cm_xlabels, params.cm_ylabels, params.source)
    sample_set = discover(params.thumb_data, need_labels=params.has_labels,
                          target_labels=params.target_labels if params.has_labels else None,
                          exclude=(folder, params.cache_root))
    if params.has_labels:
        unknown = sorted({s.label for s in sample_set.samples} - set(classes))
        if unknown:
            log.warning("labels the model does not know (counted as errors in the metrics): %s",
                        ", ".join(unknown))
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
    choose = lambda: prepare_runners(models, params, sample_set, device, threshold)  # noqa: E731
    if params.adapt_bn:
        configure_threads(device)
        models = adapt_batchnorm(models, sample_set, folder, device=device,
                                 slide_cache=params.slide_cache, resume=resume)
        choose = None  # PyTorch fp32: the engines' conversions are of the model files
    if resume and done.is_file() and not (folder / layout.PARTIAL).is_file():
        log.info("resuming after prediction: %s is complete; finishing the steps after it", done)
        table, _ = table_io.read(done, classes)
        engine_note = _timings(folder).get("inference", "not recorded")
    else:
        partial, engine_note = predict_stream(
            models, sample_set, folder, params=params, threshold=threshold, device=device,
            quiet=quiet, resume=resume, choose=choose)
        table = final_table(sample_set, partial, classes, params.has_labels, threshold, is_slide)
        atomic_csv(table, done)
        partial.unlink(missing_ok=True)
    failed = int((table["error"] != "").sum())
    counts = table.loc[table["error"] == "", "model_prediction"].value_counts()
    log.info("decisions: %s%s", ", ".join(f"{k} {v}" for k, v in counts.items()),
             f"; {failed} unreadable (see the error column)" if failed else "")

    slide_cache, slide_size = params.slide_cache, models[0].prep.slide_size
    readable = [(Path(p), d, slide) for p, d, err, slide in
                zip(table["PATH"], table["model_prediction"], table["error"], is_slide) if not err]
    if params.export_thumbnails:
        n = export_thumbnails(readable, folder, slide_size, slide_cache)
        log.info("slide thumbnails: %d in %s", n, folder / "thumbnails")
    if params.sort_thumbs:
        items = [(path, decision,
                  slides.cached_thumbnail(path, slide_size, slide_cache) if slide else None)
                 for path, decision, slide in readable]
        n = sort_copies(items, folder / "sorted", with_slides=params.sort_slides)
        log.info("sorted copies of %d files into %s", n, folder / "sorted")
    first = models[0]
    extra = explain.section(folder, table.drop(columns=["fold"], errors="ignore"),
                            {0: first.model}, list(classes), prep=first.prep, norm=first.norm,
                            arch=first.arch, per_class=params.gradcam, device=device,
                            note="made with the first model of the ensemble" if len(models) > 1
                            else "made with the model")
    notes = [f"Threshold {threshold:.3f} ({why}); "
             f"{len(models)} model{'s averaged' if len(models) > 1 else ''}"
             f"{'; test-time augmentation (8 flips/rotations)' if params.tta else ''}.",
             f"Inference: {engine_note}.", rule_note(models)]
    if params.adapt_bn:
        notes.append("Adaptation: BatchNorm statistics re-estimated on up to "
                     f"{ADAPT_IMAGES} of these deploy images (adapt_bn), saved in "
                     f"{layout.ADAPTED_BN}/; the model files are unchanged.")
    if params.has_labels:
        evaluate_run(folder, table[table["error"] == ""], classes=classes, params=params,
                     kind="deploy", sample_set=sample_set, split_df=None, failures=failed,
                     extra_sections=extra, notes=notes)
    else:
        summarise_decisions(folder, table, classes=classes, params=params, failures=failed,
                            extra_sections=extra, notes=notes)
    return folder


__all__ = ["run", "UNDECIDED"]
