"""The deployment workflow: models -> streamed predictions (resumable) -> decisions ->
sorted copies -> evaluation."""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import slides
from .cache import default_workers
from .config import DEFAULT_THRESHOLD, DeployParams, cm_layout
from .data import stream_loader, dihedral, to_input
from .decide import UNDECIDED, decide
from .engine import autocast, pick_device, softmax
from .errors import ModelError, OutputError
from .models import LoadedModel, load_model
from .results import atomic_csv, atomic_text, copy_verified, write_config
from .samples import SampleSet, check_class_names, discover
from .sorting import sort_copies

log = logging.getLogger(__name__)
PARTIAL = "predictions.partial.csv"


def model_files(entries: tuple[Path, ...]) -> list[Path]:
    """Model files from modelAdr: files, or training results folders (their fold models)."""
    files: list[Path] = []
    for entry in entries:
        if entry.is_dir():
            found = sorted(entry.glob("fold_*/model.pt"), key=lambda p: int(p.parent.name[5:]))
            if (entry / "model.pt").is_file():
                found = [entry / "model.pt"]
            if not found:
                raise ModelError(f"{entry}: no model.pt or fold_*/model.pt inside; point modelAdr "
                                 "to a model file or a training results folder")
            files += found
        elif entry.is_file():
            files.append(entry)
        else:
            raise ModelError(f"{entry}: model file not found (modelAdr); check the path")
    return files


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


def choose_threshold(params: DeployParams, models: list[LoadedModel]) -> tuple[float, str]:
    """The experiment file's threshold, else the model files' (median), else the default."""
    if params.prediction_threshold is not None:
        return params.prediction_threshold, "prediction_threshold in the experiment file"
    stored = [m.threshold for m in models if m.threshold is not None]
    if stored:
        return float(np.median(stored)), "stored in the model file" + ("s (median)" if len(stored) > 1 else "")
    return DEFAULT_THRESHOLD, "default"


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
    if not partial.is_file():
        return set()
    try:
        df = pd.read_csv(partial, usecols=["position"])
    except (ValueError, pd.errors.EmptyDataError):
        return set()
    return set(int(p) for p in df["position"])


def predict_stream(models, sample_set: SampleSet, folder: Path, *, params: DeployParams,
                   threshold: float, device: torch.device, quiet: bool) -> Path:
    """Predict every sample not yet in the partial file; append rows batch by batch."""
    partial = folder / PARTIAL
    classes = models[0].classes
    done = _done_positions(partial)
    todo = [i for i in range(len(sample_set)) if i not in done]
    if done:
        log.info("resuming: %d images predicted earlier, %d to go", len(done), len(todo))
    if not todo:
        return partial
    workers = (params.num_workers if params.num_workers >= 0
               else min(16, max(1, default_workers() - 1)))  # one core left for the model
    if device.type == "cpu":
        torch.set_num_threads(default_workers())
    prep = models[0].prep
    cache_dir = params.cache_root
    paths = [sample_set.samples[i].path for i in todo]
    batch = params.batch_size * (4 if device.type == "cuda" else 1)  # inference: no gradients
    loader = stream_loader(paths, prep, batch_size=batch, workers=workers,
                           pin_memory=device.type == "cuda", slide_cache=cache_dir / "slides")
    for m in models:
        m.model.to(device)
        if not m.legacy:
            m.model.to(memory_format=torch.channels_last)
    header = ["position", *classes, "model_prediction", "error"]
    new_file = not partial.is_file() or partial.stat().st_size == 0
    n_err = 0
    start = time.perf_counter()
    with open(partial, "a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if new_file:
            writer.writerow(header)
        bar = tqdm(total=len(todo), desc="predicting", unit="img", disable=quiet)
        for pos, x, errors in loader:
            probs = ensemble_probs(models, x, device, params.tta)
            decisions = decide(probs, classes, threshold)
            for j, p in enumerate(pos.tolist()):
                if errors[j]:
                    n_err += 1
                    log.debug("unreadable: %s", errors[j])
                    writer.writerow([todo[p], *([""] * len(classes)), "", errors[j]])
                else:
                    writer.writerow([todo[p], *(f"{v:.6g}" for v in probs[j]), decisions[j], ""])
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(pos))
        bar.close()
    secs = time.perf_counter() - start
    atomic_text(json.dumps({"predict_seconds": round(secs, 3), "images": len(todo),
                            "workers": workers, "threads": torch.get_num_threads(),
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
    df = pd.DataFrame({"PATH": [str(s.path) for s in sample_set.samples]})
    if any(s.row is not None for s in sample_set.samples):
        df["row"] = [s.row for s in sample_set.samples]
    if has_labels:
        df["CLASSIFICATION"] = [s.label for s in sample_set.samples]
    if sample_set.has_patients:
        df["PATIENT"] = [s.patient or str(s.path) for s in sample_set.samples]
    for c in classes:
        df[c] = rows[c].reindex(range(len(df))).to_numpy(dtype=float)
    df["model_prediction"] = rows["model_prediction"].reindex(range(len(df))).fillna("").to_numpy()
    df["error"] = rows["error"].reindex(range(len(df))).fillna("").to_numpy()
    df["threshold"] = threshold
    slide_rows = [i for i in range(len(df)) if is_slide[i] and not df.at[i, "error"]]
    if slide_rows:
        props = {i: slides.properties(sample_set.samples[i].path) for i in slide_rows}
        for col in slides.SLIDE_COLUMNS:
            df[col] = [props[i][col] if i in props else None for i in range(len(df))]
    return df


def explain_section(folder: Path, table: pd.DataFrame, models: list[LoadedModel],
                    params: DeployParams, device: torch.device) -> list[tuple[str, str]]:
    """Grad-CAM overlays (first model of an ensemble) as a report section."""
    from . import report
    from .explain import write_gallery

    if params.gradcam <= 0:
        return []
    m = models[0]
    fig = write_gallery({None: m.model}, table.drop(columns=["fold"], errors="ignore"),
                        list(m.classes), prep=m.prep, norm=m.norm, arch=m.arch,
                        per_class=params.gradcam, out=folder, device=device)
    if fig is None:
        return []
    note = " (first model of the ensemble)" if len(models) > 1 else ""
    return [("Grad-CAM", report.img(fig, "Grad-CAM") + f"<p class=muted>Where the model{note} "
             "looked: the most confident slides of each decision and the least certain Undecided "
             "ones; one PNG per slide in gradcam/&lt;decision&gt;/.</p>")]


def run(params: DeployParams, *, resume: bool = False, quiet: bool = False) -> Path:
    """Deploy as the experiment file says; return the results folder."""
    from .evaluate import evaluate_run, summarise_decisions

    folder = params.output
    if resume and (folder / "predictions.csv").is_file() and not (folder / PARTIAL).is_file():
        raise OutputError(f"{folder}: this deploy finished already (predictions.csv is "
                          "complete); nothing to resume. Use --output NEW_FOLDER for a new run")
    models = load_models(params)
    classes = models[0].classes
    check_class_names(classes, models[0].path)
    cm_layout(classes, params.cm_sortlabels, params.cm_xlabels, params.cm_ylabels, params.source)
    sample_set = discover(params.thumb_data, need_labels=params.has_labels,
                          target_labels=params.target_labels if params.has_labels else None)
    if params.has_labels:
        unknown = sorted({s.label for s in sample_set.samples} - set(classes))
        if unknown:
            log.warning("labels the model does not know (counted as errors in the metrics): %s",
                        ", ".join(unknown))
    write_config(params, folder, resume)
    threshold, why = choose_threshold(params, models)
    log.info("%d images; model classes: %s; threshold %.3f (%s)", len(sample_set),
             ", ".join(classes), threshold, why)
    device = pick_device(params.device)
    partial = predict_stream(models, sample_set, folder, params=params, threshold=threshold,
                             device=device, quiet=quiet)
    is_slide = [slides.is_slide(s.path) for s in sample_set.samples]
    table = final_table(sample_set, partial, classes, params.has_labels, threshold, is_slide)
    atomic_csv(table, folder / "predictions.csv")
    partial.unlink(missing_ok=True)
    failed = int((table["error"] != "").sum())
    counts = table.loc[table["error"] == "", "model_prediction"].value_counts()
    log.info("decisions: %s%s", ", ".join(f"{k} {v}" for k, v in counts.items()),
             f"; {failed} unreadable (see the error column)" if failed else "")

    slide_cache, slide_size = params.cache_root / "slides", models[0].prep.slide_size
    readable = [(Path(p), d, slide) for p, d, err, slide in
                zip(table["PATH"], table["model_prediction"], table["error"], is_slide) if not err]
    if params.export_thumbnails:
        for path, _, slide in readable:
            if slide:
                copy_verified(slides.cached_thumbnail(path, slide_size, slide_cache),
                              folder / "thumbnails" / f"{path.stem}.png")
    if params.sort_thumbs:
        items = [(path, decision,
                  slides.cached_thumbnail(path, slide_size, slide_cache) if slide else None)
                 for path, decision, slide in readable]
        made = sort_copies(items, folder / "sorted", with_slides=params.sort_slides)
        log.info("sorted copies of %d files into %s", made, folder / "sorted")
    extra = explain_section(folder, table, models, params, device)
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
