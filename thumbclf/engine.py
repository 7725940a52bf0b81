"""The training loop: train_one_epoch, evaluate, predict, early stopping, fit. No file I/O."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from scipy import special
from torch import nn
from tqdm.auto import tqdm

from . import machine
from .data import Normalisation, augment, to_input
from .errors import ConfigError
from .models import train_mode

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


def _prefetch(it: Iterable, pin: bool = False) -> Iterator:
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


def train_one_epoch(model: nn.Module, batches: Iterable, *, optimizer: torch.optim.Optimizer,
                    criterion: nn.Module, norm: Normalisation, device: torch.device,
                    gen: torch.Generator | None = None, scaler=None, total: int | None = None,
                    desc: str = "train", quiet: bool = False) -> EpochStats:
    """One pass over the training batches; ``gen`` set = augment on the fly."""
    start = time.perf_counter()
    train_mode(getattr(model, "module", model))  # the model itself inside a DDP wrapper
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in tqdm(_prefetch(batches, pin=device.type == "cuda"), total=total, desc=desc,
                     unit="batch", leave=False, disable=quiet):
        x = x.to(device, non_blocking=True)
        if gen is not None:
            x = augment(x, gen)
        inputs = to_input(x, norm, device)
        y = y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            logits, loss = training_loss(model(inputs), y, criterion)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
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
    for x, y in _prefetch(batches, pin=device.type == "cuda"):
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


def fit(model: nn.Module, *, train_batches: Batches, val_batches: Batches, n_train_batches: int,
        bn_batches: Batches | None = None,
        optimizer: torch.optim.Optimizer, criterion: nn.Module, val_criterion: nn.Module,
        stopper: EarlyStopping, norm: Normalisation, device: torch.device,
        gen: torch.Generator | None, quiet: bool = False, label: str = "",
        on_epoch: Callable[[dict], None] | None = None, resume: dict | None = None,
        trainer: nn.Module | None = None, reduce: Callable[[float], float] | None = None
        ) -> FitResult:
    """Train until early stopping; keep the best epoch's weights (lowest validation loss).

    ``on_epoch`` receives a checkpoint after every epoch (weights, optimizer, early stopping,
    history, best epoch); passing it back as ``resume`` continues from there.
    ``trainer``: what runs the training steps (a DistributedDataParallel around ``model``);
    ``reduce``: makes the validation loss the same on every process (the mean over ranks).
    """
    scaler = None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        scaler = torch.amp.GradScaler("cuda")
    result = FitResult()
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        for k, v in resume["stopper"].items():
            setattr(stopper, k, v)
        result.history = list(resume["history"])
        result.best_state = resume["best_state"]
        result.val_logits = resume["val_logits"].numpy() if resume["val_logits"] is not None else None
        log.info("%scontinuing after epoch %d", label, stopper.epoch)
    while not stopper.should_stop:
        epoch = stopper.epoch + 1
        epoch_start = time.perf_counter()
        tr = train_one_epoch(trainer or model, train_batches(), optimizer=optimizer, criterion=criterion,
                             norm=norm, device=device, gen=gen, scaler=scaler,
                             total=n_train_batches, desc=f"{label}epoch {epoch}", quiet=quiet)
        if bn_batches is not None:
            train_mode(model)
            recalibrate_bn(model, bn_batches(), norm=norm, device=device)
        va, logits = evaluate(model, val_batches(), criterion=val_criterion, norm=norm,
                              device=device)
        if reduce is not None:
            va = dataclasses.replace(va, loss=reduce(va.loss))
        improved = stopper.step(va.loss)
        if improved:
            result.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            result.val_logits = logits
        row = {"epoch": epoch, "train_loss": tr.loss, "train_accuracy": tr.accuracy,
               "val_loss": va.loss, "val_accuracy": va.accuracy,
               "lr": optimizer.param_groups[0]["lr"],
               "seconds": time.perf_counter() - epoch_start,  # training, BN statistics, validation
               "train_images_per_s": tr.n / tr.seconds if tr.seconds else float("nan"),
               "best": improved}
        result.history.append(row)
        log.info("%sepoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.3f | %.1fs%s",
                 label, epoch, tr.loss, tr.accuracy, va.loss, va.accuracy, row["seconds"],
                 " *" if improved else "")
        if on_epoch is not None:
            on_epoch({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "stopper": dataclasses.asdict(stopper), "history": result.history,
                      "best_state": result.best_state,
                      "val_logits": None if result.val_logits is None
                      else torch.from_numpy(result.val_logits)})
    result.best_epoch = stopper.best_epoch
    if result.best_state is not None:
        model.load_state_dict(result.best_state)
    return result


MIN_CALIBRATION_IMAGES = 30
TEMPERATURE_RANGE = (0.5, 5.0)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature T minimising the validation NLL of softmax(logits / T), within 0.5-5.

    Fewer than 30 validation images give 1.0 (no change): when a small split is classified
    perfectly, the NLL keeps falling as T -> 0 and would make every prediction certain.
    """
    if len(y) < MIN_CALIBRATION_IMAGES:
        log.info("validation split too small (%d images, need %d) for temperature scaling; "
                 "probabilities left uncalibrated", len(y), MIN_CALIBRATION_IMAGES)
        return 1.0
    z = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    t = torch.from_numpy(np.asarray(y)).long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")
    nll = nn.CrossEntropyLoss()

    def closure():
        opt.zero_grad()
        loss = nll(z / log_t.exp(), t)
        loss.backward()
        return loss

    opt.step(closure)
    temp = float(log_t.detach().exp())
    return float(np.clip(temp, *TEMPERATURE_RANGE)) if np.isfinite(temp) else 1.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature (float64)."""
    return special.softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
