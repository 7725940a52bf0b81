"""Self-supervised pretraining, the method: BYOL (Grill et al., NeurIPS 2020).

Two augmented views of each thumbnail; an online network (backbone, projector, predictor)
learns to predict the projection that a slowly moving average of itself (the target) gives
for the other view. No negative pairs, so no large batches: it trains on one GPU or a CPU.
The augmentations are the ones that slides vary by (stain, scanner colour, orientation, a
little scale and focus); nothing crops most of the tissue away. No file I/O here.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from thumbclf.core.errors import finite_or_diverged
from thumbclf.nn.augment import ssl_view
from thumbclf.nn.data import Normalisation, to_input
from thumbclf.nn.training import prefetch, autocast, backward_step, grad_scaler, warmup_cosine_at

log = logging.getLogger(__name__)
METHODS = ("byol",)
HIDDEN_FACTOR = 4  # hidden layers of projector and predictor: 4 x projection_dim
WARMUP_SHARE = 0.1  # of all steps: linear learning-rate warm-up, then cosine decay to 0


def mlp(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """BYOL's projector/predictor: Linear, BatchNorm, ReLU, Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out))


class BYOL(nn.Module):
    """Online backbone + projector + predictor, and a target (moving average) without predictor."""

    def __init__(self, backbone: nn.Module, feature_dim: int, projection_dim: int = 256):
        super().__init__()
        hidden = HIDDEN_FACTOR * projection_dim
        self.backbone = backbone
        self.projector = mlp(feature_dim, hidden, projection_dim)
        self.predictor = mlp(projection_dim, hidden, projection_dim)
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self.target_parameters():
            p.requires_grad_(False)

    def online_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.projector.parameters(),
                *self.predictor.parameters()]

    def target_parameters(self) -> list[nn.Parameter]:
        return [*self.target_backbone.parameters(), *self.target_projector.parameters()]

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        """The symmetric BYOL loss of two views: mean of 2 - 2 cos(prediction, target), 0-4."""
        n = v1.shape[0]
        both = torch.cat([v1, v2])
        p = self.predictor(self.projector(self.backbone(both)))
        with torch.no_grad():
            z = self.target_projector(self.target_backbone(both))
        p1, p2 = p[:n], p[n:]
        z1, z2 = z[:n].detach(), z[n:].detach()
        return 0.5 * (regression_loss(p1, z2) + regression_loss(p2, z1)).mean()

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online; BatchNorm buffers copied."""
        online = [p.detach() for p in (*self.backbone.parameters(), *self.projector.parameters())]
        target = self.target_parameters()
        torch._foreach_mul_(target, momentum)
        torch._foreach_add_(target, online, alpha=1 - momentum)
        for tm, om in ((self.target_backbone, self.backbone),
                       (self.target_projector, self.projector)):
            for tb, ob in zip(tm.buffers(), om.buffers()):
                tb.copy_(ob)


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z) per row (the squared distance of the unit vectors)."""
    return 2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=-1)


def momentum_at(step: int, total: int, base: float) -> float:
    """BYOL's schedule: from ``base`` up to 1 along a cosine over ``total`` steps."""
    return 1 - (1 - base) * (math.cos(math.pi * min(step, total) / max(total, 1)) + 1) / 2


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first tenth of the steps, then cosine decay to 0."""
    warm = max(1, int(WARMUP_SHARE * total))
    return peak * warmup_cosine_at(step, warm=warm, total=total, start=0.0, offset=1)


@dataclass
class PretrainState:
    """Where a pretraining run is: finished epochs, global step, history."""

    epoch: int = 0
    step: int = 0
    history: list = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class PretrainSpec:
    """What ``pretrain`` trains with: the batches, the optimiser, its peak learning rate and the
    target network's base momentum, and how long."""

    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    steps_per_epoch: int
    max_epochs: int
    optimizer: torch.optim.Optimizer
    lr: float
    base_momentum: float
    norm: Normalisation
    device: torch.device
    gen: torch.Generator


def pretrain(learner: BYOL, spec: PretrainSpec, *, progress: bool = True,
             on_epoch: Callable[[dict], None] | None = None, resume: dict | None = None
             ) -> list[dict]:
    """Run BYOL epochs until ``spec.max_epochs``; return the history (one row per epoch).

    ``on_epoch`` receives a checkpoint after every epoch (learner, optimizer, progress);
    passing it back as ``resume`` continues from there.
    """
    scaler = grad_scaler(spec.device)
    state = PretrainState()
    if resume is not None:
        learner.load_state_dict(resume["learner"])
        spec.optimizer.load_state_dict(resume["optimizer"])
        state = PretrainState(int(resume["epoch"]), int(resume["step"]), list(resume["history"]))
        log.info("continuing after epoch %d", state.epoch)
    while state.epoch < spec.max_epochs:
        row = _pretrain_epoch(learner, spec, state, scaler, progress)
        log.info("pretrain epoch %d/%d: loss %.4f | lr %.2g | %.1fs (%.1f images/s)",
                 row["epoch"], spec.max_epochs, row["loss"], row["lr"], row["seconds"],
                 row["images_per_s"])
        if on_epoch is not None:
            on_epoch({"learner": learner.state_dict(), "optimizer": spec.optimizer.state_dict(),
                      "epoch": state.epoch, "step": state.step, "history": state.history})
    return state.history


def _pretrain_epoch(learner: BYOL, spec: PretrainSpec, state: PretrainState, scaler,
                    progress: bool) -> dict:
    """One epoch of BYOL steps (two views of every image); its history row."""
    epoch = state.epoch + 1
    total = spec.max_epochs * spec.steps_per_epoch
    device = spec.device
    start = time.perf_counter()
    learner.train()
    loss_sum, n = 0.0, 0
    for x, _ in tqdm(prefetch(spec.batches(), pin=device.type == "cuda"),
                     total=spec.steps_per_epoch, desc=f"pretrain epoch {epoch}", unit="batch",
                     leave=False, disable=not progress):
        x = x.to(device, non_blocking=True)
        v1 = to_input(ssl_view(x, spec.gen), spec.norm, device)
        v2 = to_input(ssl_view(x, spec.gen), spec.norm, device)
        for group in spec.optimizer.param_groups:
            group["lr"] = lr_at(state.step, total, spec.lr)
        spec.optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = learner(v1, v2)
        finite_or_diverged(float(loss.detach()), f"the pretraining loss at epoch {epoch}")
        backward_step(loss, spec.optimizer, scaler)
        learner.update_target(momentum_at(state.step, total, spec.base_momentum))
        state.step += 1
        loss_sum += float(loss.detach()) * len(x)
        n += len(x)
    seconds = time.perf_counter() - start
    row = {"epoch": epoch, "loss": loss_sum / max(n, 1),
           "lr": lr_at(state.step - 1, total, spec.lr),
           "momentum": momentum_at(state.step, total, spec.base_momentum), "images": n,
           "seconds": seconds, "images_per_s": n / seconds if seconds else float("nan")}
    state.history.append(row)
    state.epoch = epoch
    return row
