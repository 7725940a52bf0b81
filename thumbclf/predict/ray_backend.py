"""executor: ray — deployment on Ray Data and cross-validation folds as Ray tasks.

The only module that imports Ray (``pip install "thumbclf[ray]"``); execution.py imports it when
an experiment asks for ``executor: ray``. The workflows see the interface of execution.py only.

Deployment: paths -> decoding on CPU workers (``map_batches`` tasks) -> inference in an actor
pool (``map_batches`` with a class and ``concurrency``; one GPU per actor where the cluster has
GPUs, the models sent once per actor through the object store) -> rows streamed back to the
driver (``iter_batches``), which appends them to the partial file as the local path does.
A decoding task whose worker dies is retried by Ray (``max_retries``); a block that still fails
is dropped (``DataContext.max_errored_blocks``) and its files are decoded again one per task and
computed by the driver, so that a file which keeps killing its worker is reported as
unreadable and the run goes on.

Folds: one Ray task per unfinished fold (``num_gpus=1`` each with GPUs, ``cpus_per_fold`` CPUs
otherwise), the decoded images shared through the object store; each task writes its fold
folder exactly as the local run does (the results folder must be visible to every node).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from thumbclf.core.errors import ConfigError, error_kind, read_failures
from thumbclf.core.table import ERROR, ERROR_KIND, SIGNALS
from thumbclf.core.logs import remove_handlers, setup_logging
from thumbclf.predict.executor import ExecutorSpec
from thumbclf.predict.ray_address import (CONNECT_TIMEOUT, address_to_use, unreachable,
                                          why_not_joined)

if TYPE_CHECKING:
    from thumbclf.inputs.images import Preprocessing

log = logging.getLogger(__name__)
DECODE_BATCH = 16  # images per decoding task: small enough that a retried task redoes little
MAX_BLOCKS = 2000  # ... but no more input blocks than this (the driver keeps track of each)
WORKER_DIED = ("the worker reading this file died {n} (killed by the system, e.g. out of "
               "memory, or a crash in the image/slide reader); left out")
# Ray Data's threads in this process that end once its execution is shut down, waited for
# before Ray itself (at most DATA_THREADS_S): its executor waits only 2 s for them, and one still
# running after ray.shutdown() reads Ray's worker and Ray then ends the whole process ("The core
# worker has already been shutdown ... The process will exit": seen once, a deploy interrupted
# on a busy machine; for a notebook that is the kernel). ``iter_threaded``: the threads that turn
# blocks into batches; one fetching the next block when the deploy was interrupted did the same
# (1 interrupted deploy in 6 on a busy machine). Not the block prefetcher's "Prefetcher": it
# stays parked for the life of the process (nothing stops it after an early close, so waiting
# would always cost DATA_THREADS_S), and with prefetch_batches=0 (predict) it is given nothing
# to fetch, so it never calls Ray
DATA_THREADS = ("StreamingExecutor-", "ray-data-metadata-prefetch", "iter_threaded")
DATA_THREADS_S = 30.0


def wait_for_data_threads() -> None:
    """Ray Data's execution threads (DATA_THREADS), given time to end before Ray does."""
    deadline = time.monotonic() + DATA_THREADS_S
    for t in threading.enumerate():
        if t.name.startswith(DATA_THREADS) and t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))


def _import_ray():
    try:
        import ray
    except ImportError:
        from thumbclf.predict.local import RAY_INSTALL

        raise ConfigError(f"executor: ray needs Ray, which is not installed; {RAY_INSTALL}") from None
    return ray


# Ray's C++ log line: "[2026-12-02 03:58:07,818 E 11120 11120] core_worker.cc:2465: ..."
RAY_LINE = re.compile(rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ([TDIWE]) \d+ \d+\] ")


@contextlib.contextmanager
def ray_lines_to_run_log() -> Iterator[None]:
    """While the block runs, Ray's own C++ log lines on this process's stderr go to run.log
    (DEBUG) instead of the console; every other line (and Ray's FATAL ones) reaches the
    console unchanged. Ray writes every C++ ERROR of the driver to stderr whatever its logging
    settings (only RAY_BACKEND_LOG_LEVEL silences it, in every Ray log file too), and Ray Data
    makes one for each inference actor ("constructor arguments in the object store and
    max_restarts > 0"; its own references, held for the whole run). Ray's log files keep them.
    """
    sys.stderr.flush()
    console = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def pump() -> None:
        with os.fdopen(read, "rb") as lines:
            for line in lines:
                if RAY_LINE.match(line):
                    log.debug("Ray's log: %s",
                              line.decode("utf-8", "backslashreplace").rstrip())
                    continue
                view = memoryview(line)
                try:
                    while view:
                        view = view[os.write(console, view):]
                except OSError:  # the console is gone (a closed pipe): keep draining, or
                    pass         # every writer to stderr would block once the pipe is full

    thread = threading.Thread(target=pump, name="ray-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(console, 2)  # the pipe's last writer closes: the pump reads to its end
        thread.join(timeout=5)
        if not thread.is_alive():  # else a process of Ray's holds the pipe: leave it its copy
            os.close(console)


def _join_or_start(ray, spec: ExecutorSpec, progress: bool) -> str:
    """ray.init for a run: joins the cluster of ``ray_address`` or RAY_ADDRESS, else starts an
    instance on this machine; the address joined ('' for an instance of its own). What goes
    wrong is one line (ConfigError)."""
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": progress,
                              "logging_level": logging.ERROR,
                              "configure_logging": True}
    address, origin = address_to_use(spec.ray_address)
    undo = "remove ray_address" if origin == "ray_address" else "unset RAY_ADDRESS"
    why = unreachable(address) if origin else None
    if why:  # Ray itself retries for many minutes, deaf to SIGTERM meanwhile
        raise ConfigError(f"{spec.source}: {origin}: cannot reach a Ray cluster at "
                          f"{address} within {CONNECT_TIMEOUT:g}s ({why}); check the "
                          f"address and that the cluster runs (ray status), or {undo} "
                          "to start Ray on this machine")
    kwargs["address"] = address
    if not origin:
        from thumbclf.core import machine

        kwargs["num_cpus"] = machine.cores()
    stops = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]
    handlers = {sig: signal.getsignal(sig) for sig in stops}
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        if not origin:
            raise ConfigError(f"{spec.source}: executor: ray: cannot start Ray on this "
                              f"machine ({why_not_joined(exc)})") from None
        raise ConfigError(f"{spec.source}: {origin}: cannot join Ray at {address} "
                          f"({why_not_joined(exc)}); check the address, or {undo} to "
                          "start Ray on this machine") from None
    finally:  # Ray's own handlers abort the process; Ctrl-C/SIGTERM stay a clean stop
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
    return address if origin else ""


class RayExecutor:
    """Joins (``ray_address``) or starts a Ray instance; predicts and trains folds on it."""

    name = "ray"

    def __init__(self, spec: ExecutorSpec, *, progress: bool = True):
        ray = _import_ray()
        self.spec, self.progress, self.ray = spec, progress, ray
        start = time.perf_counter()
        self.started_here, self.address = False, spec.ray_address or ""
        if not ray.is_initialized():  # a notebook may have connected already: use that
            self.address, self.started_here = _join_or_start(ray, spec, progress), True
        self.start_seconds = time.perf_counter() - start
        resources = ray.cluster_resources()
        self.cpus = int(resources.get("CPU", 1))
        self.gpus = int(resources.get("GPU", 0)) if spec.device != "cpu" else 0
        self.node_cpus = [float(n.get("Resources", {}).get("CPU", 0))
                          for n in ray.nodes() if n.get("Alive")]  # a head may have none
        self.nodes = max(1, sum(1 for c in self.node_cpus if c > 0))
        log.info("Ray: %s, %d CPUs, %d GPUs on %d node(s) (ready in %.1fs)",
                 self.address or "local instance", self.cpus, self.gpus, self.nodes,
                 self.start_seconds)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # thumbclf's own bar counts the rows
        ctx.print_on_execution_start = False
        ctx.max_errored_blocks = -1  # a block whose worker keeps dying: retried one file at a time
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        self.actors = 0

    def close(self) -> None:
        if self.started_here:
            wait_for_data_threads()
            self.ray.shutdown()

    def describe(self) -> dict:
        return {"executor": self.name, "ray_start_seconds": round(self.start_seconds, 3),
                "cluster_cpus": self.cpus, "cluster_gpus": self.gpus,
                "inference_actors": self.actors}

    # ---------------------------------------------------------------- deployment

    def predict(self, models, positions: list[int], paths: list[Path], *, device,
                slide_cache: Path | None, runners=None) -> Iterator:
        """Batches (positions, probabilities, signals, errors) as Ray Data streams them; each
        actor computes as ``runners`` do here (their recipes: the verified engine and its band,
        issue 29), and the images it recomputed in fp32 are counted in the band here."""
        from thumbclf.predict.local import decode_workers

        ray, spec = self.ray, self.spec
        models_ref = ray.put(models)  # sent once; each actor loads it once
        self.recipes = [r.recipe() for r in runners] if runners else None
        band = runners[0].band if runners else None
        gpus = self.gpus > 0  # 0 when device: cpu
        self.actors = self.gpus if gpus else self.nodes  # one per GPU, else one per node
        # on this machine: the same decoding workers as the local path; on a cluster: Ray's choice
        decoders = decode_workers(spec.num_workers) if not spec.ray_address else None
        threads = max(1, self.cpus // self.nodes)  # a CPU actor computes with its node's cores,
        # as the local path's model does beside its decoding workers
        plan = _Plan(models_ref, models[0].prep, slide_cache, gpus=gpus, decoders=decoders,
                     threads=threads, batch=spec.batch_size * (4 if gpus else 1),
                     cpu=stage_cpus(self.node_cpus))
        seen: set[int] = set()
        todo = list(zip(positions, (str(p) for p in paths)))
        # prefetch_batches=0: the rows need no prefetching here (they are small, and the
        # actors computed them), and a prefetch thread's ray.wait could still run after
        # ray.shutdown() once a deploy was interrupted (DATA_THREADS)
        stream = iter(self._dataset(todo, plan).iter_batches(
            batch_size=None, batch_format="numpy", prefetch_batches=0))
        try:
            for out in stream:
                pos = np.asarray(out["position"], dtype=np.int64)
                seen.update(pos.tolist())
                signals = {c: np.asarray(out[c], dtype=float) for c in SIGNALS}
                if band is not None:
                    band.count(np.asarray(out["recomputed"], dtype=bool))
                yield (pos, np.asarray(out["probs"], dtype=float),
                       {c: v for c, v in signals.items() if not np.isnan(v).all()},
                       read_failures(out[ERROR], out[ERROR_KIND]))
        finally:  # stopped early (Ctrl-C): end Ray Data's execution before Ray itself
            getattr(stream, "close", lambda: None)()
        todo = [(p, path) for p, path in todo if p not in seen]
        if todo:
            log.warning("%d images were in decoding tasks whose worker died; trying them "
                        "again one file per task", len(todo))
            yield from self._one_by_one(todo, plan, models, runners, device)

    def _one_by_one(self, todo, plan: _Plan, models, runners, device) -> Iterator:
        """The files of the decoding tasks whose worker died, each decoded in a task of its own
        and computed here with ``runners``; a file that ends every worker: an error row. Not a
        second pipeline: its new actors waited forever for the CPUs (or GPU) that the first
        one's actors hold until Ray collects them (seen on 2 CPUs, issue 32)."""
        import torch

        from thumbclf.predict.ensemble import exact_runners
        from thumbclf.predict.local import computed

        ray = self.ray
        runners = runners or exact_runners(models, device)
        task = ray.remote(_decode_batch).options(num_cpus=plan.cpu, max_retries=_RETRIES)
        refs = [(p, path, task.remote({"position": np.array([p]), "path": np.array([path])},
                                      prep=plan.prep, slide_cache=plan.slide_cache))
                for p, path in todo]
        died = WORKER_DIED.format(n="once" if _RETRIES == 0 else f"{1 + _RETRIES} times")
        for p, path, ref in refs:
            try:
                out = ray.get(ref)
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError):
                yield (np.array([p]), np.zeros((1, len(models[0].classes))), {},
                       [f"{path}: {died}"])
                continue
            yield from computed(models, runners, [(
                out["position"], torch.from_numpy(out["image"]),
                read_failures(out[ERROR], out[ERROR_KIND]), out["looks"])], device, self.spec.tta)

    def _dataset(self, todo, plan: _Plan):
        import pandas as pd

        ray = self.ray
        frame = pd.DataFrame({"position": [p for p, _ in todo],
                              "path": pd.Series([s for _, s in todo], dtype=object)})
        rows = max(DECODE_BATCH, -(-len(todo) // MAX_BLOCKS))  # a task decodes one block; few blocks
        ds = ray.data.from_pandas([frame.iloc[i:i + rows] for i in range(0, len(frame), rows)])
        decode_args: dict[str, Any] = {"num_cpus": plan.cpu, "max_retries": _RETRIES}
        if plan.decoders:
            decode_args["concurrency"] = plan.decoders
        with warnings.catch_warnings():  # max_retries & co. have no named parameter (Ray 2.60)
            warnings.simplefilter("ignore", DeprecationWarning)
            return self._stages(ds, plan, decode_args)

    def _stages(self, ds, plan: _Plan, decode_args: dict[str, Any]):
        ds = ds.map_batches(_decode_batch, batch_size=DECODE_BATCH, batch_format="numpy",
                            fn_kwargs={"prep": plan.prep, "slide_cache": plan.slide_cache},
                            **decode_args)
        return ds.map_batches(
            _Infer, batch_size=plan.batch, batch_format="numpy", concurrency=self.actors,
            num_cpus=plan.cpu, num_gpus=1 if plan.gpus else 0,
            fn_constructor_kwargs={"models": plan.models_ref, "tta": self.spec.tta,
                                   "device": "cuda" if plan.gpus else "cpu",
                                   "threads": plan.threads, "recipes": self.recipes},
            max_restarts=_RETRIES, max_task_retries=_RETRIES)

    # ---------------------------------------------------------------- folds

    def run_folds(self, fn: Callable, folds: list[int], shared: dict[str, Any], *,
                  device) -> Iterator:
        """One Ray task per fold; results in fold order (each waits for its own fold)."""
        ray, spec = self.ray, self.spec
        per_fold = spec.cpus_per_fold
        options = {"num_cpus": fold_cpus(per_fold, self.node_cpus, len(folds), spec.source,
                                         gpus=bool(self.gpus))}
        if self.gpus:
            options["num_gpus"] = 1
        shared_ref = ray.put(shared)  # the decoded images once, not once per fold
        task = ray.remote(_fold_task).options(max_retries=0, **options)
        log.info("%d folds as Ray tasks, each with %s", len(folds),
                 ", ".join(f"{v} {k.removeprefix('num_')}" for k, v in options.items()))
        refs = [task.remote(fn, fold, shared_ref, options["num_cpus"], spec.device,
                            self.progress) for fold in folds]
        for ref in refs:
            try:
                yield ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the fold's own error, as locally
                cause = getattr(exc, "cause", None)
                raise (cause if isinstance(cause, Exception) else exc) from None


_RETRIES = 2  # Ray retries a task whose worker died this many times


def stage_cpus(node_cpus: list[float]) -> float:
    """The CPUs each inference actor and decoding task asks for: 1, or 0.5 where a node has one
    CPU (the model and the decoding share it; a whole CPU each, and Ray waited forever)."""
    return 1.0 if min((c for c in node_cpus if c > 0), default=1.0) >= 2 else 0.5


def fold_cpus(requested: int | None, node_cpus: list[float], folds: int, source: str, *,
              gpus: bool = False) -> int:
    """The CPUs of each fold's task: ``cpus_per_fold``, or a fair share of the cluster that fits
    on its largest node (a task asking more than any node has waits forever)."""
    largest = int(max(node_cpus, default=1))
    if requested and requested > largest:
        raise ConfigError(f"{source}: cpus_per_fold: {requested}, but the largest node of the "
                          f"Ray cluster has {largest} CPUs, and Ray would wait for a larger one "
                          f"forever; set cpus_per_fold to at most {largest}")
    if requested or gpus:
        return requested or 1
    return max(1, min(largest, int(sum(node_cpus)) // max(1, folds)))


@dataclass(frozen=True)
class _Plan:
    """What every attempt of one deployment's pipeline shares: the models (in the object store)
    and how to decode their images, where the actors compute (``gpus``: one GPU each), the
    decoding tasks at once (None: Ray's choice), each CPU actor's threads, its batch size."""

    models_ref: Any  # a ray.ObjectRef
    prep: Preprocessing
    slide_cache: Path | None
    gpus: bool
    decoders: int | None
    threads: int
    batch: int
    cpu: float = 1.0  # each actor's and decoding task's CPUs: 0.5 on a node of one CPU


def _decode_batch(batch: dict, *, prep, slide_cache) -> dict:
    """Ray Data task: decode a batch of files (unreadable ones: white image plus the reason)."""
    from thumbclf.core.machine import keep_freed_memory
    from thumbclf.nn.data import FileImages, collate

    keep_freed_memory()

    files = FileImages([Path(p) for p in batch["path"]], prep, slide_cache)
    _, images, errors, looks = collate([files[i] for i in range(len(files))], prep.size,
                                       looks=True)
    return {"position": batch["position"], "image": images.numpy(), "looks": looks,
            ERROR: np.array(errors, dtype=object),
            ERROR_KIND: np.array([error_kind(e) for e in errors], dtype=object)}


class _Infer:
    """Ray Data actor: the models loaded once, then batch after batch of images -> probabilities."""

    def __init__(self, models, tta: bool, device: str, threads: int, recipes=None):
        import ray
        import torch

        from thumbclf.core.machine import keep_freed_memory
        from thumbclf.nn.training import pick_device
        from thumbclf.predict.inference import rebuild

        keep_freed_memory()  # a process of Ray's that serves this deploy's batches
        if isinstance(models, ray.ObjectRef):
            models = ray.get(models)
        self.models, self.tta = models, tta
        self.device = pick_device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        # the driver's engines: PyTorch fp32, or the verified candidate with its band
        self.runners = rebuild(self.models, recipes or [None] * len(models), self.device)

    def __call__(self, batch: dict) -> dict:
        import torch

        from thumbclf.predict.ensemble import ensemble_predict

        probs, signals = ensemble_predict(
            self.models, self.runners, torch.from_numpy(np.ascontiguousarray(batch["image"])),
            self.device, self.tta, looks=batch.get("looks"))
        missing = np.full(len(probs), np.nan)  # a column Ray Data can carry
        band = self.runners[0].band
        redo = band.last if band is not None else np.zeros(len(probs), dtype=bool)
        return {"position": batch["position"], "probs": probs,
                **{c: signals.get(c, missing) for c in SIGNALS}, ERROR: batch[ERROR],
                ERROR_KIND: batch[ERROR_KIND], "recomputed": redo}


def _fold_task(fn: Callable, fold: int, shared: dict, threads: int, device_name: str,
               progress: bool):
    """Ray task: train one fold with ``threads`` CPU threads, logging into the run's run.log."""
    import torch

    from thumbclf.core.machine import keep_freed_memory
    from thumbclf.nn.training import pick_device

    keep_freed_memory()
    setup_logging(Path(shared["folder"]), quiet=not progress, tag=f"fold {fold}, pid {os.getpid()}")
    try:
        device = pick_device(device_name)
        if device.type == "cpu":
            torch.set_num_threads(threads)
        return fn(fold=fold, device=device, **{**shared, "progress": False})
    finally:
        remove_handlers()
