"""The run lifecycle: refuse to overwrite a results folder, lock it, log to run.log, save the
resolved settings."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from thumbclf.config import KEY_BY_NAME, WORKFLOW_OF, params_to_dict
from thumbclf.core import layout
from thumbclf.core.errors import ConfigError, OutputError
from thumbclf.predict.executor import ExecutorSpec, InferenceSpec

from thumbclf.core.files import OutputLock, atomic_bytes, atomic_yaml
from thumbclf.core.table import PATH

log = logging.getLogger(__name__)


SETUP_ONLY = {layout.RUN_LOG, layout.CONFIG, layout.LOCK, ".write-test"}  # a run that never got going


def check_cache_apart(params) -> None:
    """ConfigError when the cache folder is, or lies inside, a folder input or a folder that a
    table's images live in (issue 33: matplotlib's cache went there): thumbclf never writes into
    its inputs (and would read its own cache as images)."""
    data, cache = getattr(params, "thumb_data", None), params.cache_root
    if data is None:
        return
    data, chosen = Path(data), "cache_dir" in getattr(params, "given", ())
    # a table's image folders: a cache_dir you chose may not lie in one; the default cache,
    # beside the results folder, may sit beside the images (never among a folder input's)
    folders = ([data] if data.is_dir() else _table_folders(data) if data.is_file() and chosen
               else [])
    for folder in folders:
        if layout.inside(folder, cache):
            where = "the input folder" if folder.resolve() == cache.resolve() else "inside it"
            if not chosen:  # the default cache, beside --output
                raise ConfigError(f"{params.output}: the results folder is inside the input "
                                  f"folder {folder} (thumbData: {data}), and so would be its "
                                  f"cache ({cache}); thumbclf never writes into its inputs: "
                                  "choose an --output outside it")
            if folder != data:
                where = f"in {folder}, a folder of the table's images"
            raise ConfigError(f"{params.source}: cache_dir {cache} is {where} (thumbData: "
                              f"{data}); thumbclf never writes into its inputs: choose a "
                              "cache_dir outside it")


def _table_folders(table: Path) -> list[Path]:
    """The folders a table's images (or DICOM slide folders) live in; [] where the table cannot
    be read now (reading it reports that later, with its row)."""
    from thumbclf.inputs.samples import read_table

    try:
        df = read_table(table)
    except Exception:  # noqa: BLE001 - discover() names the problem with the row
        return []
    column = next((c for c in df.columns if str(c).upper() == PATH), None)
    if column is None:
        return []
    out = set()
    for text in df[column].dropna().astype(str):
        path = table.parent / text  # an absolute path stays itself
        try:
            out.add(path if path.is_dir() else path.parent)
        except OSError:  # a name too long: its row says so later
            out.add(path.parent)
    return sorted(out)


def check_output(folder: Path, *, resume: bool) -> None:
    """OutputError unless ``folder`` may take this run: a new or set-up-only folder, or, with
    ``resume``, an existing one. (prepare_output checks again, under the lock.)"""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder; choose another --output")
    if resume and not folder.is_dir():
        raise OutputError(f"{folder}: nothing to resume (no such results folder); run without "
                          "--resume")
    if not resume and folder.is_dir() and _has_results(folder):
        raise OutputError(f"{folder}: results folder is not empty; thumbclf never overwrites a "
                          "run. Use --resume to continue it, or --output NEW_FOLDER")


def _has_results(folder: Path) -> bool:
    return any(p.name not in SETUP_ONLY and not p.name.startswith("experiment.")
               for p in folder.iterdir())


def prepare_output(folder: Path, *, resume: bool) -> OutputLock:
    """Create and lock the results folder; refuse one with results in it unless resuming.

    A folder holding only what a failed start leaves (run.log, config.yaml, the experiment
    copy, caches) is reused, so fixing the input and running again just works. The caller
    owns the returned lock until it releases it (or the process ends).
    """
    check_output(folder, resume=resume)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write the results folder ({exc.strerror or exc}); "
                          "choose a writable --output") from None
    lock = OutputLock(folder).acquire()  # creating the lock file also proves the folder writable
    try:
        check_output(folder, resume=resume)  # again: another run may have written meanwhile
    except OutputError:
        lock.release()
        raise
    return lock


def write_config(params, folder: Path, resume: bool) -> None:
    """config.yaml (resolved params) and a verbatim copy of the experiment file.

    On --resume the settings must equal the interrupted run's.
    """
    resolved = params_to_dict(params)
    resolved.pop("output", None)
    cfg = folder / layout.CONFIG
    if resume and cfg.is_file():
        old = yaml.safe_load(cfg.read_text())
        # a key added since that run counts as its default there
        workflow = WORKFLOW_OF.get(type(params), "train")
        old.update({k: KEY_BY_NAME[k].default_for(workflow) for k in resolved
                    if k not in old and k in KEY_BY_NAME})
        changed = sorted(k for k in set(old) | set(resolved)
                         if old.get(k) != resolved.get(k) and k != "source")
        if changed:
            raise ConfigError(f"{params.source}: differs from the interrupted run in "
                              f"{', '.join(changed)}; --resume needs the same settings (or start "
                              "a new run with --output)")
        return
    atomic_yaml(resolved, cfg)
    atomic_bytes(params.source.read_bytes(), folder / f"experiment{params.source.suffix}")


def executor_spec(params) -> ExecutorSpec:
    """The executor keys of a run's params, for predict.execution.executor_for."""
    return ExecutorSpec(executor=params.executor, num_workers=params.num_workers,
                        batch_size=params.batch_size, tta=getattr(params, "tta", False),
                        device=params.device, ray_address=params.ray_address,
                        cpus_per_fold=getattr(params, "cpus_per_fold", 0), source=params.source)


def inference_spec(params, *, progress: bool = False) -> InferenceSpec:
    """How a deploy's params say to predict (batches, workers, engine, precision, caches,
    verification images), for predict/stream.py and predict/engines.py."""
    return InferenceSpec(executor=executor_spec(params), engine=params.engine,
                         precision=params.precision, cache_dir=params.cache_root,
                         slide_cache=params.slide_cache, verify_data=params.verify_data,
                         progress=progress)
