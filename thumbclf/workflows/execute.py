"""Running a workflow: check what can be checked, then lock the results folder, log into it
and run the params' workflow (also as one rank of a torchrun training)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Iterator

from thumbclf.config import Params
from thumbclf.core import machine
from thumbclf.core.errors import ConfigError

log = logging.getLogger(__name__)


EXPERIMENT_COPY = "experiment.yaml"  # a dict experiment is saved as this in its results folder


def _settle_process(params: Params) -> None:
    """What this process keeps for the run, before the workflow's imports and first batch: the
    libraries' caches in the run's cache folder, and freed memory for the next batch."""
    from thumbclf.core.privacy import keep_caches_in

    keep_caches_in(params.cache_root)  # before the workflow imports matplotlib
    machine.keep_freed_memory()


def execute(params: Params, *, resume: bool = False, quiet: bool = False, debug: bool = False,
            progress: bool = True, raw: dict | None = None, shard=None) -> Path:
    """Prepare the results folder, log into it and run the params' workflow; return the folder.

    ``raw``: the dict an experiment came from; it is saved as experiment.yaml in the results
    folder, which then stands for the experiment file (the copy beside config.yaml).
    ``shard``: a deploy's share (workflows/shards.py), deployed into its own folder; a finished
    one is skipped, an interrupted one continued.
    """
    import yaml

    from thumbclf.config import TRAIN, WORKFLOW_OF
    from thumbclf.core.files import atomic_text
    from thumbclf.workflows.run import check_output, prepare_output
    from thumbclf.core.logs import setup_logging

    workflow = WORKFLOW_OF[type(params)]
    from thumbclf.nn import distributed

    ranks = distributed.active()  # torchrun
    if ranks:  # before the workflow's imports: each rank's refusal is quick
        _refuse_ranks(params, workflow)
    from thumbclf.workflows.run import check_cache_apart

    check_cache_apart(params)  # before anything is written into the cache folder
    _settle_process(params)
    if workflow == TRAIN:
        from thumbclf.workflows.train import preflight, run
    elif workflow == "pretrain":
        from thumbclf.workflows.pretrain import preflight, run
    else:
        # decoding workers share the cores with the model: idle OpenMP threads should sleep,
        # not spin (measured +10% on PNG thumbnails on 2 cores); read when torch loads
        # (lower case: libgomp compares it case-insensitively in the user's locale, where a
        # Turkish one folds "I" to a dotless "ı" and rejects "PASSIVE", issue 33)
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")
        from thumbclf.workflows.deploy import preflight, run
    if ranks:  # torchrun: rank 0 owns the results folder, the others train along
        return _execute_ranks(params, workflow, resume=resume, quiet=quiet, debug=debug,
                              progress=progress)
    folder, resume, skip = _folder(params, shard, resume)
    if skip:
        return folder
    check_output(folder, resume=resume)  # everything that can be checked before the
    preflight(params)  # first file is written: the folder, the inputs, weights, caches
    with prepare_output(folder, resume=resume), machine.returned_memory():  # the run's
        if raw is not None:
            copy = folder / EXPERIMENT_COPY
            if not (resume and copy.is_file()):
                atomic_text(f"# given to thumbclf.{workflow}() as a dict; its relative paths "
                            f"start at {Path.cwd()}\n"
                            + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), copy)
            params = dataclasses.replace(params, source=copy)
        setup_logging(folder, quiet=quiet, debug=debug)
        log.info("thumbclf %s: %s -> %s", workflow, params.source, folder)
        if shard is not None:
            return run(params, resume=resume, progress=progress, shard=shard)
        return run(params, resume=resume, progress=progress)


def _folder(params: Params, shard, resume: bool) -> tuple[Path, bool, bool]:
    """The run's folder, whether it resumes, and whether it is a finished shard to skip."""
    if shard is None:
        return params.output, resume, False
    from thumbclf.workflows import shards  # issue 30: a SLURM array's share, in its own folder

    folder = shards.folder_of(params.output, shard)
    if shards.is_finished(folder):
        log.warning("shard %s (%s) finished already in %s; skipped", shard, shard.why, folder)
        return folder, resume, True
    return folder, folder.is_dir() and any(folder.iterdir()), False  # a re-submitted array
    # goes on


def _refuse_ranks(params: Params, workflow: str) -> None:
    """torchrun trains; it does not deploy, pretrain or combine with Ray."""
    from thumbclf.config import DEPLOY, TRAIN

    where = f"{params.source}: "
    if workflow != TRAIN:
        ray = " (or with executor: ray for many machines)" if workflow == DEPLOY else ""
        raise ConfigError(f"{where}torchrun trains one model on several GPUs/processes; run "
                          f"{workflow} as one process{ray}")
    if params.executor == "ray":
        raise ConfigError(f"{where}executor: ray and torchrun do not combine; use torchrun for "
                          "one model on several GPUs, or executor: ray for folds in parallel")


def _execute_ranks(params: Params, workflow: str, *, resume: bool, quiet: bool, debug: bool,
                   progress: bool) -> Path:
    """``execute`` for one rank of a torchrun training (see distributed.py)."""
    from thumbclf.core.errors import ThumbclfError
    from thumbclf.nn import distributed
    from thumbclf.workflows.run import check_output, prepare_output
    from thumbclf.core.logs import setup_logging

    from thumbclf.workflows.train import preflight, run

    distributed.init(params.device)
    try:
        problem = None
        if distributed.is_main():
            try:
                check_output(params.output, resume=resume)
                preflight(params)
            except ThumbclfError as exc:
                problem = exc
        problem = distributed.share(problem)  # every rank stops on rank 0's error
        if problem is not None:
            raise problem
        if not distributed.is_main():  # no files, no console but errors, no progress bars
            setup_logging(None, quiet=True)
            logging.getLogger().handlers[-1].setLevel(logging.ERROR)
            return run(params, resume=resume, progress=False)
        with prepare_output(params.output, resume=resume):
            setup_logging(params.output, quiet=quiet, debug=debug)
            log.info("thumbclf %s: %s -> %s (torchrun: %d processes)", workflow, params.source,
                     params.output, distributed.world_size())
            return run(params, resume=resume, progress=progress)
    finally:
        distributed.finish()


@contextlib.contextmanager
def own_logging() -> Iterator[None]:
    """Leave the caller's logging as it was: remove the handlers a run adds (console, run.log)."""
    root = logging.getLogger()
    level, before = root.level, set(root.handlers)
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in before and getattr(h, "_thumbclf", False):
                root.removeHandler(h)
                h.close()
        root.setLevel(level)

