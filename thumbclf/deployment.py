"""The deployment workflow: models -> streamed predictions (resumable) -> decisions ->
sorted copies -> evaluation."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import explain, layout, slides
from . import table as table_io
from .config import DeployParams, cm_layout
from .data import dihedral, to_input
from .execution import executor_for
from .decide import UNDECIDED, decide, threshold_in_force
from .engine import autocast, configure_threads, pick_device, softmax
from .errors import ModelError, OutputError
from .evaluate import evaluate_run, summarise_decisions
from .models import LoadedModel, load_model
from .results import append_whole, atomic_csv, atomic_text, check_writable, repair_tail, write_config
from .samples import SampleSet, check_class_names, check_input, discover
from .sorting import copy_all, sort_copies

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
    return loaded


@torch.inference_mode()
def ensemble_probs(models: list[LoadedModel], x: torch.Tensor, device: torch.device,
                   tta: bool) -> np.ndarray:
    """Average of each model's calibrated softmax (over 8 flips/rotations with TTA)."""
    first = models[0]
    inputs = to_input(x, first.norm, device, channels_last=not first.legacy)
    total = None
    for m in models:
        with autocast(device):
            if tta:
                logits = torch.stack([m.model(dihedral(inputs, k)).float() for k in range(8)]).mean(0)
            else:
                logits = m.model(inputs).float()
        p = softmax(logits.cpu().numpy(), m.temperature)
        total = p if total is None else total + p
    return total / len(models)


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


def predict_stream(models, sample_set: SampleSet, folder: Path, *, params: DeployParams,
                   threshold: float, device: torch.device, quiet: bool, resume: bool) -> Path:
    """Predict every sample not yet in the partial file; append rows batch by batch.

    Each batch's rows are appended whole (one synced write), so a crash or a full disk never
    tears a row; --resume predicts only what is missing.
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
        return partial
    configure_threads(device)
    cache_dir = params.cache_root
    header = ["position", *classes, "model_prediction", "error"]
    new_file = not partial.is_file() or partial.stat().st_size == 0
    n_err = 0
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="predicting", unit="img", disable=quiet)
    with executor_for(params, quiet=quiet) as ex:
        paths = [sample_set.samples[i].path for i in todo]
        # closing: an interruption stops the executor's pipeline before the executor ends
        with contextlib.closing(ex.predict(models, todo, paths, device=device,
                                           slide_cache=cache_dir / "slides")) as batches:
            for pos, probs, errors in batches:
                decisions = decide(probs, classes, threshold)
                rows = [header] if new_file else []
                new_file = False
                for j, p in enumerate(pos.tolist()):
                    if errors[j]:
                        n_err += 1
                        log.debug("unreadable: %s", errors[j])
                        rows.append([p, *([""] * len(classes)), "", errors[j]])
                    else:
                        rows.append([p, *(f"{v:.6g}" for v in probs[j]), decisions[j], ""])
                append_whole(partial, _csv_rows(rows))
                bar.update(len(pos))
        how = ex.describe()
    bar.close()
    secs = time.perf_counter() - start
    atomic_text(json.dumps({"predict_seconds": round(secs, 3), "images": len(todo),
                            **how, "threads": torch.get_num_threads(),
                            "peak_memory_mb": peak_memory_mb()}, indent=1),
                folder / "timings.json")
    log.info("predicted %d images in %.1fs (%.1f images/s)%s", len(todo), secs,
             len(todo) / secs if secs else 0, f"; {n_err} could not be read" if n_err else "")
    return partial


def final_table(sample_set: SampleSet, partial: Path, classes: tuple[str, ...],
                has_labels: bool, threshold: float, is_slide: list[bool]) -> pd.DataFrame:
    """The predictions table in input order, with slide properties where there are slides."""
    rows = pd.read_csv(partial, dtype={"model_prediction": str, "error": str},
                       keep_default_na=False, na_values={c: [""] for c in classes})
    rows = rows.drop_duplicates("position", keep="last").set_index("position").sort_index()
    rows = rows.reindex(range(len(sample_set)))
    errors = rows["error"].fillna("").to_numpy()
    slide_properties = [slides.properties(s.path) if slide and not err else None
                        for s, slide, err in zip(sample_set.samples, is_slide, errors)]
    return table_io.build(sample_set.samples, rows[list(classes)].to_numpy(dtype=float), classes,
                          rows["model_prediction"].fillna("").to_numpy(), threshold=threshold,
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
    if resume and done.is_file() and not (folder / layout.PARTIAL).is_file():
        log.info("resuming after prediction: %s is complete; finishing the steps after it", done)
        table, _ = table_io.read(done, classes)
    else:
        partial = predict_stream(models, sample_set, folder, params=params, threshold=threshold,
                                 device=device, quiet=quiet, resume=resume)
        table = final_table(sample_set, partial, classes, params.has_labels, threshold, is_slide)
        atomic_csv(table, done)
        partial.unlink(missing_ok=True)
    failed = int((table["error"] != "").sum())
    counts = table.loc[table["error"] == "", "model_prediction"].value_counts()
    log.info("decisions: %s%s", ", ".join(f"{k} {v}" for k, v in counts.items()),
             f"; {failed} unreadable (see the error column)" if failed else "")

    slide_cache, slide_size = params.cache_root / "slides", models[0].prep.slide_size
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
             f"{'; test-time augmentation (8 flips/rotations)' if params.tta else ''}."]
    if params.has_labels:
        evaluate_run(folder, table[table["error"] == ""], classes=classes, params=params,
                     kind="deploy", sample_set=sample_set, split_df=None, failures=failed,
                     extra_sections=extra, notes=notes)
    else:
        summarise_decisions(folder, table, classes=classes, params=params, failures=failed,
                            extra_sections=extra, notes=notes)
    return folder


__all__ = ["run", "UNDECIDED"]
