"""Predictions streamed into the partial file, batch by batch (resumable, flat memory), then
read back as the predictions table in input order; or, for the Python API, the same rows kept
in memory (``predict_table``: no folder written)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from thumbclf.core import layout
from thumbclf.core.machine import memory_kept
from thumbclf.core import table as table_io
from thumbclf.core.decide import decide_with_reasons
from thumbclf.core.errors import (DataError, ImageReadError, ModelError, OutputError, ReadFailure,
                                  clean, error_kind, read_failures)
from thumbclf.core.files import append_whole, atomic_csv, atomic_text, file_digest, repair_tail
from thumbclf.inputs import readrecord, slides
from thumbclf.inputs.samples import SampleSet, input_columns
from thumbclf.nn.training import configure_threads
from thumbclf.nn.data import stream_loader
from thumbclf.predict import gate
from thumbclf.predict.ensemble import exact_runners
from thumbclf.predict.execution import executor_for
from thumbclf.predict.engines import Head, fp32_suffices
from thumbclf.predict.executor import InferenceSpec
from thumbclf.predict.local import computed, decode_workers

log = logging.getLogger(__name__)


def timings(folder: Path) -> dict:
    try:
        return json.loads((folder / layout.TIMINGS).read_text())
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
        df = table_io.read_csv(partial, usecols=["position"], numeric=["position"])
    except (ValueError, pd.errors.EmptyDataError, pd.errors.ParserError):
        raise OutputError(f"{partial}: unreadable ({partial.stat().st_size} bytes); delete it to "
                          "predict every image again, or start a new run with --output") from None
    return set(int(p) for p in df["position"])


def _csv_rows(rows: list[list]) -> bytes:
    return table_io.csv_rows(rows).encode("utf-8", "surrogateescape")


def check_same_inputs(folder: Path, sample_set: SampleSet, resume: bool) -> None:
    """The inputs of a deploy, written once (inputs.csv); a resume must have the same ones, or
    earlier rows would be given to other files."""
    paths = [str(s.path) for s in sample_set.samples]
    listed = folder / layout.INPUTS
    if resume and listed.is_file():
        before = table_io.read_csv(listed)[table_io.PATH].tolist()
        if before != paths:
            raise DataError(f"{sample_set.source}: the inputs differ from those of the "
                            f"interrupted run ({len(before)} then, {len(paths)} now, listed in "
                            f"{listed}); restore them, or start a new run with --output")
        return
    atomic_csv(pd.DataFrame({"position": range(len(paths)), table_io.PATH: table_io.text(paths)}),
               listed)


def check_same_models(folder: Path, models: list, resume: bool) -> None:
    """The model files of a deploy and their sha256, written once (models.csv); a resume must
    use the same files, or the rows predicted before and after it would come from two models."""
    paths = [str(m.path) for m in models]
    digests = [file_digest(m.path) if m.path is not None else "" for m in models]
    listed = folder / layout.MODELS
    if resume and listed.is_file():
        before = table_io.read_csv(listed)
        if "sha256" not in before or before["sha256"].tolist() != digests:
            changed = next((p for p, d, b in zip(paths, digests, before.get("sha256", []))
                            if d != b), ", ".join(paths))
            raise ModelError(f"{changed}: the model files differ from those the interrupted run "
                             f"predicted with (sha256 in {listed}); restore them, or start a new "
                             "run with --output")
        return
    atomic_csv(pd.DataFrame({"model": table_io.text(paths), "sha256": digests}), listed)


def predict_stream(models, sample_set: SampleSet, folder: Path, *, spec: InferenceSpec,
                   threshold: float, device: torch.device, resume: bool,
                   choose=None) -> tuple[Path, str]:
    """Predict every sample not yet in the partial file; append rows batch by batch; return
    the partial file and which engine computed.

    Each batch's rows are appended whole (one synced write), so a crash or a full disk never
    tears a row; --resume predicts only what is missing. ``choose(head)`` gives the runners
    (and why) from the stream's first images (head: their paths and uint8 batch), decoded once
    here and computed here with those runners; by default PyTorch fp32.
    """
    partial = folder / layout.PARTIAL
    classes = models[0].classes
    if partial.is_file() and not resume:
        raise OutputError(f"{partial}: left by an interrupted run; continue it with --resume")
    done = _done_positions(partial)
    if partial.is_file():  # before anything starts, and before final_table reads its columns
        check_partial_header(partial, partial_header(classes))
    todo = [i for i in range(len(sample_set)) if i not in done]
    if done:
        log.info("resuming: %d images predicted earlier, %d to go", len(done), len(todo))
    if not todo:
        return partial, timings(folder).get("inference", "not recorded")
    configure_threads(device)
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="predicting", unit="img", disable=not spec.progress)
    with executor_for(spec.executor, progress=spec.progress) as ex:
        runners, engine_note, batches = _start(ex, models, sample_set, todo, spec, device,
                                               choose)
        # closing: an interruption stops the executor's pipeline before the executor ends
        with contextlib.closing(batches):
            n_err = append_batches(batches, partial, classes, threshold, bar=bar)
        how = ex.describe()
    bar.close()
    band = runners[0].band if runners else None
    if band is not None:  # issue 29: the share the band sent to PyTorch fp32
        engine_note = f"{engine_note}; {band.describe()}"
        log.info("exact reduced precision: %s", band.describe())
    secs = time.perf_counter() - start
    atomic_text(json.dumps({"predict_seconds": round(secs, 3), "images": len(todo),
                            **how, "threads": torch.get_num_threads(),
                            "peak_memory_mb": peak_memory_mb(), "memory_kept": memory_kept(),
                            "inference": engine_note},
                           indent=1),
                folder / layout.TIMINGS)
    log.info("predicted %d images in %.1fs (%.1f images/s)%s", len(todo), secs,
             len(todo) / secs if secs else 0, f"; {n_err} could not be read" if n_err else "")
    return partial, engine_note


def predict_table(models, sample_set: SampleSet, spec: InferenceSpec, *, threshold: float,
                  device: torch.device, has_labels: bool, runners) -> pd.DataFrame:
    """The predictions table of ``sample_set`` as ``predict_stream`` and ``final_table`` make
    it, with ``runners`` (PyTorch fp32 where there are fewer images than the quality gate
    verifies on, as a deploy computes them), in memory: no folder is written (the Python API)."""
    classes, todo = models[0].classes, list(range(len(sample_set)))
    configure_threads(device)
    bar = tqdm(total=len(todo), desc="predicting", unit="img", disable=not spec.progress)
    with executor_for(spec.executor, progress=spec.progress) as ex:
        _, _, batches = _start(ex, models, sample_set, todo, spec, device,
                               lambda head: (runners, ""))
        with contextlib.closing(batches):
            rows = predicted_rows(batches, classes, threshold, bar=bar)
    bar.close()
    is_slide = [slides.is_slide(s.path) for s in sample_set.samples]
    return final_table(sample_set, rows, classes, has_labels, threshold, is_slide,
                       read_from=(models[0].prep.slide_size, spec.slide_cache))


def _start(ex, models, sample_set: SampleSet, todo: list[int], spec: InferenceSpec, device,
           choose):
    """The runners (and why) and the stream's batches. The verification images are the
    stream's first (issue 29), decoded once and only if a verdict needs them (``Head``): by the
    executor's own stream where it runs here (local: its workers go on decoding while the gate
    computes), else here, before the rest goes to the executor."""
    paths = [sample_set.samples[i].path for i in todo]
    small = fp32_suffices(len(todo), spec) if choose is not None else None
    if choose is None or small:  # small: no head to wait for, so rows are written from the first
        runners = exact_runners(models, device)
        if small:
            log.info("inference: %s", small)
        return runners, small or "PyTorch fp32", ex.predict(
            models, todo, paths, device=device, slide_cache=spec.slide_cache, runners=runners)
    local = ex.name == "local"
    decoded = (ex.decoded(models, todo, paths, device=device, slide_cache=spec.slide_cache)
               if local else _head_loader(models, todo, paths, spec))
    head: list = []  # the batches the verification took from the stream, if it took any

    def take():  # the first AGREEMENT_IMAGES of the stream (a for, then on below)
        for batch in decoded:
            head.append(batch)
            if sum(len(b[0]) for b in head) >= gate.AGREEMENT_IMAGES:
                break
        return _readable(head, sample_set)

    runners, engine_note = choose(Head(paths[:gate.AGREEMENT_IMAGES], take))
    n = sum(len(b[0]) for b in head)
    if local:
        rest = computed(models, runners, decoded, device, spec.tta)
    else:
        rest = ex.predict(models, todo[n:], paths[n:], device=device,
                          slide_cache=spec.slide_cache, runners=runners) if todo[n:] else None
    return runners, engine_note, _chain(computed(models, runners, head, device, spec.tta),
                                        rest, decoded)


def _readable(batches: list, sample_set: SampleSet) -> list[tuple[list[Path], torch.Tensor]]:
    """The readable images of decoded batches (positions, uint8 images, errors, looks): their
    paths and pixels."""
    readable = []
    for pos, x, errors, _ in batches:
        ok = np.array([not e for e in errors], dtype=bool)
        if ok.any():
            readable.append(([sample_set.samples[p].path for p in pos[ok]],
                             x[torch.from_numpy(ok)]))
    return readable


def _head_loader(models, todo: list[int], paths: list[Path], spec: InferenceSpec):
    """The stream's first images, decoded here (an executor elsewhere gets the rest)."""
    loader = stream_loader(paths[:gate.AGREEMENT_IMAGES], models[0].prep,
                           batch_size=spec.batch_size,
                           workers=decode_workers(spec.num_workers), pin_memory=False,
                           slide_cache=spec.slide_cache, looks=True)
    head = np.asarray(todo[:gate.AGREEMENT_IMAGES])
    for pos, x, errors, looks in loader:
        yield head[pos.numpy()], x, list(errors), looks


def _chain(first, rest, decoded):
    """``first``'s batches, then ``rest``'s; closed, it closes both and the decoding."""
    try:
        yield from first
        if rest is not None:
            yield from rest
    finally:
        for it in (first, rest, decoded):
            getattr(it, "close", lambda: None)()


def check_partial_header(partial: Path, header: list[str]) -> None:
    """An interrupted run's partial file has the columns this version writes."""
    try:
        found = list(table_io.read_csv(partial, nrows=0).columns)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        found = []
    if found != header:
        raise OutputError(f"{partial}: written with other columns ({', '.join(found[:12])}) by "
                          "another thumbclf version or model; start a new run with --output "
                          "(or delete the file to predict every image again)")


def final_table(sample_set: SampleSet, partial: Path | io.BytesIO, classes: tuple[str, ...],
                has_labels: bool, threshold: float, is_slide: list[bool],
                read_from: tuple[int, Path] | None = None) -> pd.DataFrame:
    """The predictions table in input order from the partial file's rows (a file, or the same
    bytes in memory: ``predicted_rows``), with slide properties where there are slides, and
    their read records from the thumbnail cache ``read_from`` (thumbnail size, folder)."""
    rows = read_rows(partial, len(sample_set), classes)
    errors = row_errors(rows)
    slide_properties = _properties(sample_set, is_slide, rows, errors, classes)
    records = None
    if read_from is not None:  # issue 30: the read record, kept beside the cached thumbnail
        records = [readrecord.of_slide(s.path, *read_from, properties=props,
                                       mpp_override=s.mpp) if props is not None else None
                   for s, props in zip(sample_set.samples, slide_properties)]
    inputs = input_columns(sample_set.samples, labels=has_labels,
                           patients=sample_set.has_patients,
                           rows=any(s.row is not None for s in sample_set.samples))
    return table_of(rows, dataclasses.replace(inputs, errors=errors,
                                              slide_properties=slide_properties,
                                              read_records=records), classes, threshold)


def read_rows(partial: Path | io.BytesIO, n: int, classes) -> pd.DataFrame:
    """The partial file's rows by position 0..n-1 (the last of repeated ones; missing: empty)."""
    rows = table_io.read_csv(partial, numeric=["position", *classes, *table_io.SIGNALS])
    rows = rows.drop_duplicates("position", keep="last").set_index("position").sort_index()
    return rows.reindex(range(n))


def row_errors(rows: pd.DataFrame) -> np.ndarray:
    """The rows' errors (``read_rows``), each with its kind ('' for a readable input)."""
    return np.array(read_failures(rows[table_io.ERROR].fillna(""),
                                  rows[table_io.ERROR_KIND].fillna("")), dtype=object)


def table_of(rows: pd.DataFrame, inputs: table_io.InputColumns, classes,
             threshold: float) -> pd.DataFrame:
    """The predictions table of ``inputs`` from their rows (``read_rows``)."""
    signals = {c: rows[c].to_numpy(dtype=float) for c in table_io.SIGNALS}
    return table_io.build(inputs, rows[list(classes)].to_numpy(dtype=float), classes,
                          rows[table_io.DECISION].fillna("").to_numpy(), threshold=threshold,
                          reasons=rows[table_io.REASON].fillna("").to_numpy(),
                          signals={c: v for c, v in signals.items() if not np.isnan(v).all()})


def _properties(sample_set: SampleSet, is_slide: list[bool], rows: pd.DataFrame,
                errors: np.ndarray, classes) -> list[dict | None]:
    """Each readable slide's properties; a slide whose properties cannot be read (a truncated
    file) gets the error in its row, and its prediction is dropped: that slide's row, never the
    whole table (issue 33)."""
    found: list[dict | None] = []
    for i, (s, slide) in enumerate(zip(sample_set.samples, is_slide)):
        found.append(None)
        if slide and not errors[i]:
            try:
                found[i] = slides.properties(s.path)
            except ImageReadError as exc:
                log.warning("%s", clean(str(exc)))
                errors[i] = ReadFailure(clean(str(exc)), exc.kind)
                rows.loc[i, [*classes, table_io.DECISION, table_io.REASON,
                             *table_io.SIGNALS]] = np.nan
    return found


def partial_header(classes) -> list[str]:
    """The columns of the partial file: position, probabilities, decision, reason, the decision
    step's other inputs (table.SIGNALS), error and its kind."""
    return ["position", *classes, table_io.DECISION, table_io.REASON, *table_io.SIGNALS,
            table_io.ERROR, table_io.ERROR_KIND]


def append_batches(batches, partial: Path, classes, threshold: float, *, bar=None) -> int:
    """Decide every batch of (positions, probabilities, signals, errors) and append its rows
    whole to the partial file; the number of unreadable images. The one path from a
    prediction to a row (``batch_rows``), for the command line and the API alike."""
    header = partial_header(classes)
    new_file = not partial.is_file() or partial.stat().st_size == 0
    if not new_file:
        check_partial_header(partial, header)
    n_err = 0
    for batch in batches:
        rows = batch_rows(batch, classes, threshold)
        n_err += sum(1 for e in batch[3] if e)
        append_whole(partial, _csv_rows([header, *rows] if new_file else rows))
        new_file = False
        if bar is not None:
            bar.update(len(batch[0]))
    return n_err


def predicted_rows(batches, classes, threshold: float, *, bar=None) -> io.BytesIO:
    """The bytes ``append_batches`` would write for ``batches`` (header first), in memory."""
    rows = [partial_header(classes)]
    for batch in batches:
        rows += batch_rows(batch, classes, threshold)
        if bar is not None:
            bar.update(len(batch[0]))
    return io.BytesIO(_csv_rows(rows))


def batch_rows(batch, classes, threshold: float) -> list[list]:
    """One batch of (positions, probabilities, signals, errors), decided: its partial rows."""
    pos, probs, signals, errors = batch
    decisions, reasons = decide_with_reasons(probs, classes, threshold,
                                             signals.get(table_io.UNFAMILIARITY),
                                             signals.get(table_io.TISSUE))
    columns = [signals.get(c) for c in table_io.SIGNALS]
    blank = [""] * (len(classes) + 2 + len(table_io.SIGNALS))
    rows = []
    for j, p in enumerate(pos.tolist()):
        if errors[j]:
            log.debug("unreadable: %s", errors[j])
            rows.append([p, *blank, clean(errors[j]), error_kind(errors[j])])
        else:
            rows.append([p, *(f"{v:.6g}" for v in probs[j]), decisions[j], reasons[j],
                         *("" if c is None else f"{c[j]:.4g}" for c in columns), "", ""])
    return rows
