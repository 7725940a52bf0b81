"""The training loop: train_one_epoch, evaluate, predict, early stopping, fit. No file I/O."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from scipy import special
from torch import nn
from tqdm.auto import tqdm

from thumbclf.core import machine
from thumbclf.core.errors import ConfigError, finite_or_diverged
from thumbclf.nn import familiarity
from thumbclf.nn.data import Normalisation, to_input
from thumbclf.nn.augment import augment
from thumbclf.nn.freeze import train_mode

log = logging.getLogger(__name__)
Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA when available (or asked for), otherwise the CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA GPU is available; "
                          "use device: auto or cpu")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def configure_threads(device: torch.device, threads: int = 0) -> None:
    """On the CPU, torch computes with ``threads`` threads (0: every core this process may use)."""
    if device.type == "cpu":
        torch.set_num_threads(threads or machine.cores())


def autocast(device: torch.device):
    """Mixed precision on CUDA (bf16 where supported, else fp16); a no-op on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without a lower validation loss, never before
    ``stop_epoch``, never after ``max_epochs``; remembers the best epoch."""

    patience: int
    stop_epoch: int
    max_epochs: int
    best_loss: float = float("inf")
    best_epoch: int = 0
    epoch: int = 0

    def step(self, val_loss: float) -> bool:
        """Record one finished epoch; True when it is the best so far."""
        self.epoch += 1
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch = val_loss, self.epoch
            return True
        return False

    @property
    def should_stop(self) -> bool:
        if self.epoch >= self.max_epochs:
            return True
        return self.epoch >= self.stop_epoch and self.epoch - self.best_epoch >= self.patience


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    n: int
    seconds: float


def prefetch(it: Iterable, pin: bool = False) -> Iterator:
    """Prepare the next batch in a thread (pinned for CUDA) while the model works on this one."""
    it = iter(it) if not pin else ((x.pin_memory(), y) for x, y in it)
    with ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(next, it, None)
        while True:
            item = fut.result()
            if item is None:
                return
            fut = pool.submit(next, it, None)
            yield item


AUX_WEIGHT = 0.4


def training_loss(output, y: torch.Tensor, criterion: nn.Module
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and loss of a training step. Inception v3 in training mode also returns auxiliary
    logits: loss = main + 0.4 * auxiliary, as in torchvision's fine-tuning tutorial (in
    evaluation it returns the main logits only)."""
    if isinstance(output, tuple):  # InceptionOutputs(logits, aux_logits)
        logits, *aux = output
        loss = criterion(logits.float(), y)
        for extra in aux:
            if extra is not None:
                loss = loss + AUX_WEIGHT * criterion(extra.float(), y)
        return logits, loss
    return output, criterion(output.float(), y)


def train_one_epoch(model: nn.Module, batches: Iterable, *, spec: FitSpec, scaler=None,
                    desc: str = "train", progress: bool = True,
                    schedule: Callable[[], None] | None = None) -> EpochStats:
    """One pass over the training batches with ``spec``'s optimiser, loss, normalisation and
    device; ``spec.gen`` set = augment on the fly (``spec.stain``: the lab-to-lab part's
    strength); ``schedule()`` after every step sets the next learning rate."""
    start = time.perf_counter()
    train_mode(getattr(model, "module", model))  # the model itself inside a DDP wrapper
    device, optimizer = spec.device, spec.optimizer
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in tqdm(prefetch(batches, pin=device.type == "cuda"), total=spec.n_train_batches,
                     desc=desc, unit="batch", leave=False, disable=not progress):
        x = x.to(device, non_blocking=True)
        if spec.gen is not None:
            x = augment(x, spec.gen, spec.stain)
        inputs = to_input(x, spec.norm, device)
        y = y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            logits, loss = training_loss(model(inputs), y, spec.criterion)
        finite_or_diverged(float(loss.detach()), "the training loss")
        backward_step(loss, optimizer, scaler)
        if schedule is not None:
            schedule()
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    return EpochStats(loss_sum / max(n, 1), correct / max(n, 1), n, time.perf_counter() - start)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, *, norm: Normalisation,
                   device: torch.device, max_images: int = 256) -> None:
    """Re-estimate trainable BatchNorm statistics with the epoch's final weights ("precise BN").

    Running averages collected while the weights were still changing lag behind them; on small
    data trained from scratch that can wreck evaluation-mode predictions. Frozen BN is untouched.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.training and m.track_running_stats]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    seen = 0
    for x, _ in batches:
        with autocast(device):
            model(to_input(x.to(device, non_blocking=True), norm, device))
        seen += len(x)
        if seen >= max_images:
            break
    for m, mom in zip(bns, saved):
        m.momentum = mom


@torch.inference_mode()
def predict_logits(model: nn.Module, batches: Iterable, *, norm: Normalisation,
                   device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Logits (n, classes) and the targets (or empty) of every batch, in order."""
    model.eval()
    outs, ys = [], []
    for x, y in prefetch(batches, pin=device.type == "cuda"):
        with autocast(device):
            outs.append(model(to_input(x, norm, device)).float().cpu())
        if y is not None:
            ys.append(y)
    logits = torch.cat(outs).numpy() if outs else np.zeros((0, 0))
    return logits, (torch.cat(ys).numpy() if ys else np.zeros(0, dtype=int))


def evaluate(model: nn.Module, batches: Iterable, *, criterion: nn.Module, norm: Normalisation,
             device: torch.device) -> tuple[EpochStats, np.ndarray]:
    """Loss and accuracy on labelled batches, plus the logits."""
    start = time.perf_counter()
    logits, y = predict_logits(model, batches, norm=norm, device=device)
    if len(y) == 0:
        return EpochStats(float("nan"), float("nan"), 0, 0.0), logits
    t = torch.from_numpy(logits)
    loss = float(criterion(t, torch.from_numpy(y).long()))
    acc = float((t.argmax(1).numpy() == y).mean())
    return EpochStats(loss, acc, len(y), time.perf_counter() - start), logits


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_state: dict | None = None
    val_logits: np.ndarray | None = None
    # the best epoch's features (FitSpec.features_head): of its validation pass, in order, and
    # of a seeded sample of at most ``bank_size`` of its training passes (augmented, train mode)
    val_features: np.ndarray | None = None
    train_features: np.ndarray | None = None


@dataclass(frozen=True)
class FitSpec:
    """What ``fit`` trains with: the batches, the losses, the optimiser and its schedule, early
    stopping, and (DDP) the module that runs the steps and the reduction of the validation loss.

    ``lr_schedule``: 'constant', or 'cosine' (linear warm-up over the first epoch to the
    optimizer's lr, then cosine decay to 0 at ``stopper.max_epochs``; stepped every batch).
    ``stain``: strength of the lab-to-lab augmentation (data.stain_shift).
    ``bn_batches``: unaugmented training batches to re-estimate BatchNorm statistics after each
    epoch. ``trainer``: what runs the training steps (a DistributedDataParallel around the
    model); ``reduce``: makes the validation loss the same on every process (mean over ranks).
    """

    train_batches: Batches
    val_batches: Batches
    n_train_batches: int
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    val_criterion: nn.Module
    stopper: EarlyStopping
    norm: Normalisation
    device: torch.device
    gen: torch.Generator | None = None
    bn_batches: Batches | None = None
    stain: float = 0.0
    lr_schedule: str = "constant"
    trainer: nn.Module | None = None
    reduce: Callable[[float], float] | None = None
    features_head: str | None = None  # keep the features of the passes (familiarity.Capture)
    bank_size: int = 1024
    seed: int = 0


def fit(model: nn.Module, spec: FitSpec, *, progress: bool = True, label: str = "",
        on_epoch: Callable[[dict], None] | None = None, resume: dict | None = None) -> FitResult:
    """Train until early stopping; keep the best epoch's weights (lowest validation loss).

    ``on_epoch`` receives a checkpoint after every epoch (weights, optimizer, early stopping,
    history, best epoch); passing it back as ``resume`` continues from there.
    """
    scaler = grad_scaler(spec.device)
    scheduler = None
    if spec.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            spec.optimizer, warmup_cosine(max(1, spec.n_train_batches), spec.stopper.max_epochs))
    result = FitResult()
    if resume is not None:
        _restore(model, spec, scheduler, result, resume)
        log.info("%scontinuing after epoch %d", label, spec.stopper.epoch)
    while not spec.stopper.should_stop:
        row = _epoch(model, spec, result, scaler=scaler, scheduler=scheduler, progress=progress,
                     label=label)
        log.info("%sepoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.3f | %.1fs%s",
                 label, row["epoch"], row["train_loss"], row["train_accuracy"], row["val_loss"],
                 row["val_accuracy"], row["seconds"], " *" if row["best"] else "")
        if on_epoch is not None:
            on_epoch({"model": model.state_dict(), "optimizer": spec.optimizer.state_dict(),
                      "scheduler": scheduler.state_dict() if scheduler else None,
                      "stopper": dataclasses.asdict(spec.stopper), "history": result.history,
                      "best_state": result.best_state,
                      "val_logits": None if result.val_logits is None
                      else torch.from_numpy(result.val_logits),
                      **_features_state(result)})
    result.best_epoch = spec.stopper.best_epoch
    if result.best_state is not None:
        model.load_state_dict(result.best_state)
    return result


def _restore(model: nn.Module, spec: FitSpec, scheduler, result: FitResult, resume: dict) -> None:
    """Continue from a checkpoint that ``fit``'s ``on_epoch`` received."""
    model.load_state_dict(resume["model"])
    spec.optimizer.load_state_dict(resume["optimizer"])
    if scheduler is not None and resume.get("scheduler") is not None:
        scheduler.load_state_dict(resume["scheduler"])
        for group, lr in zip(spec.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    for k, v in resume["stopper"].items():
        setattr(spec.stopper, k, v)
    result.history = list(resume["history"])
    result.best_state = resume["best_state"]
    result.val_logits = (resume["val_logits"].numpy() if resume["val_logits"] is not None
                         else None)
    for name in ("val_features", "train_features"):  # absent from older checkpoints
        value = resume.get(name)
        setattr(result, name, value.float().numpy() if value is not None else None)


def _features_state(result: FitResult) -> dict:
    return {name: None if getattr(result, name) is None
            else torch.from_numpy(getattr(result, name)).half()
            for name in ("val_features", "train_features")}


def _epoch(model: nn.Module, spec: FitSpec, result: FitResult, *, scaler, scheduler,
           progress: bool, label: str) -> dict:
    """One epoch: train, BatchNorm statistics, validation, early stopping; its history row."""
    epoch = spec.stopper.epoch + 1
    epoch_start = time.perf_counter()
    with familiarity.Capture(model, spec.features_head) as seen:
        tr = train_one_epoch(spec.trainer or model, spec.train_batches(), spec=spec,
                             scaler=scaler, desc=f"{label}epoch {epoch}", progress=progress,
                             schedule=scheduler.step if scheduler else None)
    if spec.bn_batches is not None:
        train_mode(model)
        recalibrate_bn(model, spec.bn_batches(), norm=spec.norm, device=spec.device)
    with familiarity.Capture(model, spec.features_head) as val_seen:
        va, logits = evaluate(model, spec.val_batches(), criterion=spec.val_criterion,
                              norm=spec.norm, device=spec.device)
    if spec.reduce is not None:
        va = dataclasses.replace(va, loss=spec.reduce(va.loss))
    finite_or_diverged(va.loss if va.n else 0.0, "the validation loss")
    improved = spec.stopper.step(va.loss)
    if improved:
        result.best_state = copy.deepcopy({k: v.detach().cpu()
                                           for k, v in model.state_dict().items()})
        result.val_logits = logits
        result.val_features = val_seen.features()
        result.train_features = _sample(seen.features(), spec.bank_size, [spec.seed, epoch])
    row = {"epoch": epoch, "train_loss": tr.loss, "train_accuracy": tr.accuracy,
           "val_loss": va.loss, "val_accuracy": va.accuracy,
           "lr": spec.optimizer.param_groups[0]["lr"],
           "seconds": time.perf_counter() - epoch_start,  # training, BN statistics, validation
           "train_images_per_s": tr.n / tr.seconds if tr.seconds else float("nan"),
           "best": improved}
    result.history.append(row)
    return row


def _sample(rows: np.ndarray | None, n: int, seed) -> np.ndarray | None:
    """At most ``n`` of ``rows`` (a seeded choice, in their order)."""
    if rows is None or len(rows) <= n:
        return rows
    return rows[np.sort(np.random.default_rng(seed).permutation(len(rows))[:n])]


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler=None) -> None:
    """Back-propagate ``loss`` and step the optimiser (through the fp16 gradient scaler on GPUs
    without bf16)."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def grad_scaler(device: torch.device):
    """The fp16 gradient scaler where autocast computes in fp16 (CUDA without bf16), else None."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.amp.GradScaler("cuda")
    return None


def warmup_cosine_at(step: int, *, warm: int, total: int, start: float = 0.1,
                     offset: int = 0) -> float:
    """The learning-rate factor at ``step``: linear from ``start`` to 1 over ``warm`` steps
    (counting from ``step + offset``), then a cosine to 0 at ``total``. The one schedule of
    supervised training and pretraining."""
    if step < warm:
        return start + (1 - start) * (step + offset) / warm
    done = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def warmup_cosine(steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    """Supervised training's factor at a step: 0.1 -> 1 over the first epoch, then a cosine to
    0 at the end of ``epochs``."""
    total = steps_per_epoch * max(epochs, 1)
    return lambda step: warmup_cosine_at(step, warm=steps_per_epoch, total=total)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature (float64)."""
    return special.softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
