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

from thumbclf.nn.data import Normalisation, dihedral, to_input
from thumbclf.nn.engine import _prefetch, autocast

log = logging.getLogger(__name__)
METHODS = ("byol",)
HIDDEN_FACTOR = 4  # hidden layers of projector and predictor: 4 x projection_dim
WARMUP_SHARE = 0.1  # of all steps: linear learning-rate warm-up, then cosine decay to 0

def _hed_matrices(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stain vectors of haematoxylin, eosin and DAB (Ruifrok & Johnston 2001) and the inverse."""
    rgb_from_hed = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    rgb_from_hed = rgb_from_hed / rgb_from_hed.norm(dim=1, keepdim=True)
    return rgb_from_hed.to(device), torch.linalg.inv(rgb_from_hed).to(device)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of (n, 3, H, W) with one sigma (pixels) per image; sigma 0 = unchanged."""
    n, c, h, w = x.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.clamp_min(1e-3).view(n, 1)
    k = torch.exp(-0.5 * (t.view(1, -1) / s) ** 2)
    k = k / k.sum(1, keepdim=True)  # n, K; sigma ~0 gives a delta
    k = k.repeat_interleave(c, 0)  # n*c, K
    y = x.reshape(1, n * c, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def ssl_view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random view of uint8 (n, H, W, 3) thumbnails, as uint8 (n, H, W, 3).

    Flips and 90-degree rotations; stain jitter in haematoxylin/eosin/DAB space; brightness,
    contrast and saturation; scale 0.85-1.15 and a shift of up to 8% (glass fills in);
    Gaussian blur on half of the images. Colour changes stay moderate: colour tells IHC from
    H&E, and the representation should keep that.
    """
    n, size = x.shape[0], x.shape[1]
    dev = x.device

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:  # parameters drawn on the CPU
        return (lo + (hi - lo) * torch.rand(*shape, generator=gen)).to(dev)

    ks = torch.randint(0, 8, (n,), generator=gen)
    v = x.permute(0, 3, 1, 2).float().div_(255.0)
    v = torch.stack([dihedral(v[i], int(ks[i])) for i in range(n)])
    # geometry: mild scale and shift about the centre, glass where the picture moves in (before
    # the colour changes, which then tint that glass like the rest)
    s = u(0.85, 1.15, n)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = 1 / s
    theta[:, 1, 1] = 1 / s
    theta[:, :, 2] = u(-0.16, 0.16, n, 2)  # normalised coordinates: 0.16 = 8% of the side
    grid = F.affine_grid(theta, list(v.shape), align_corners=False)
    v = 1 - F.grid_sample(1 - v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # stain: optical density -> H, E, DAB concentrations, scaled and shifted per image
    rgb_from_hed, hed_from_rgb = _hed_matrices(dev)
    od = -torch.log(v.clamp(1 / 255, 1)).permute(0, 2, 3, 1)  # n, H, W, 3
    hed = od @ hed_from_rgb
    hed = hed * u(0.9, 1.1, n, 1, 1, 3) + u(-0.03, 0.03, n, 1, 1, 3)
    v = torch.exp(-(hed @ rgb_from_hed)).permute(0, 3, 1, 2).clamp(0, 1)
    # scanner: brightness, contrast, saturation
    v = v * u(0.85, 1.15, n, 1, 1, 1)
    mean = v.mean(dim=(1, 2, 3), keepdim=True)
    v = (v - mean) * u(0.8, 1.2, n, 1, 1, 1) + mean
    grey = v.mean(dim=1, keepdim=True)
    v = (v - grey) * u(0.8, 1.2, n, 1, 1, 1) + grey
    v = v.clamp(0, 1)
    # focus: blur half of the images (sigma up to 1.5 px at 224 px)
    sigma = u(0.1, 1.5, n) * (size / 224) * (torch.rand(n, generator=gen) < 0.5).to(dev)
    if float(sigma.max()) > 0.05:
        v = _blur(v, sigma)
    v = v.clamp_(0, 1).mul_(255.0).round_().to(torch.uint8)
    return v.permute(0, 2, 3, 1).contiguous()


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
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@dataclass
class PretrainState:
    """Where a pretraining run is: finished epochs, global step, history."""

    epoch: int = 0
    step: int = 0
    history: list = dataclasses.field(default_factory=list)


def pretrain(learner: BYOL, *, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
             steps_per_epoch: int, max_epochs: int, optimizer: torch.optim.Optimizer,
             lr: float, base_momentum: float, norm: Normalisation, device: torch.device,
             gen: torch.Generator, quiet: bool = False,
             on_epoch: Callable[[dict], None] | None = None, resume: dict | None = None
             ) -> list[dict]:
    """Run BYOL epochs until ``max_epochs``; return the history (one row per epoch).

    ``on_epoch`` receives a checkpoint after every epoch (learner, optimizer, progress);
    passing it back as ``resume`` continues from there.
    """
    scaler = None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        scaler = torch.amp.GradScaler("cuda")
    state = PretrainState()
    if resume is not None:
        learner.load_state_dict(resume["learner"])
        optimizer.load_state_dict(resume["optimizer"])
        state = PretrainState(int(resume["epoch"]), int(resume["step"]), list(resume["history"]))
        log.info("continuing after epoch %d", state.epoch)
    total = max_epochs * steps_per_epoch
    while state.epoch < max_epochs:
        epoch = state.epoch + 1
        start = time.perf_counter()
        learner.train()
        loss_sum, n = 0.0, 0
        for x, _ in tqdm(_prefetch(batches(), pin=device.type == "cuda"), total=steps_per_epoch,
                         desc=f"pretrain epoch {epoch}", unit="batch", leave=False,
                         disable=quiet):
            x = x.to(device, non_blocking=True)
            v1 = to_input(ssl_view(x, gen), norm, device)
            v2 = to_input(ssl_view(x, gen), norm, device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state.step, total, lr)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device):
                loss = learner(v1, v2)
            if not torch.isfinite(loss):
                from thumbclf.core.errors import ConfigError

                raise ConfigError(f"pretraining diverged at epoch {epoch} (loss {float(loss)}); "
                                  "lower lr")
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            learner.update_target(momentum_at(state.step, total, base_momentum))
            state.step += 1
            loss_sum += float(loss.detach()) * len(x)
            n += len(x)
        seconds = time.perf_counter() - start
        row = {"epoch": epoch, "loss": loss_sum / max(n, 1), "lr": lr_at(state.step - 1, total, lr),
               "momentum": momentum_at(state.step, total, base_momentum), "images": n,
               "seconds": seconds, "images_per_s": n / seconds if seconds else float("nan")}
        state.history.append(row)
        state.epoch = epoch
        log.info("pretrain epoch %d/%d: loss %.4f | lr %.2g | %.1fs (%.1f images/s)", epoch,
                 max_epochs, row["loss"], row["lr"], seconds, row["images_per_s"])
        if on_epoch is not None:
            on_epoch({"learner": learner.state_dict(), "optimizer": optimizer.state_dict(),
                      "epoch": state.epoch, "step": state.step, "history": state.history})
    return state.history
