"""Freezing the first share of a backbone (freezeRatio) by its top-level blocks, with frozen
BatchNorm layers kept in evaluation mode."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from torch import nn

from thumbclf.nn.models import head_names

log = logging.getLogger(__name__)


FREEZE_SPLIT = 0.8  # a block holding more than this share of the body is split into its children


@dataclass
class Block:
    """One unit of freezeRatio: a submodule, plus parameters of the parents split around it."""

    name: str
    module: nn.Module
    loose: list[nn.Parameter] = field(default_factory=list)

    def size(self) -> int:
        return sum(p.numel() for p in self.module.parameters()) + sum(p.numel() for p in self.loose)


def blocks(model: nn.Module) -> list[Block]:
    """The blocks freezeRatio freezes, in order: the top-level children, where a block holding
    more than 80% of the parameters outside the head is replaced by its own children (repeatedly).

    ResNet: conv1, bn1, relu, maxpool, layer1-4, avgpool, fc; VGG/AlexNet/SqueezeNet/DenseNet/
    EfficientNet/MobileNet/ConvNeXt/Swin: the layers or stages of ``features``, then the rest;
    ViT: conv_proj, the encoder's dropout, its 12 layers and final norm, heads.
    A parent's own parameters (ViT's class token, position embedding) go with its first block.
    """
    heads = head_names(model)
    out = [Block(n, m) for n, m in model.named_children()]
    if out:
        out[0].loose += list(model.parameters(recurse=False))
    while True:
        body = [b for b in out if not holds_head(b.name, heads)]
        total = sum(b.size() for b in body)
        big = max(body, key=Block.size, default=None)
        children = list(big.module.named_children()) if big is not None else []
        if not total or not children or big.size() <= FREEZE_SPLIT * total:
            return out
        inner = [Block(f"{big.name}.{n}", m) for n, m in children]
        inner[0].loose += big.loose + list(big.module.parameters(recurse=False))
        i = out.index(big)
        out[i:i + 1] = inner


def holds_head(block_name: str, heads: list[str]) -> bool:
    """True when the block is, or contains, a classification head."""
    return any(h == block_name or h.startswith(block_name + ".") for h in heads)


def freeze(model: nn.Module, name: str, ratio: float) -> list[str]:
    """Freeze the first ``ratio`` of the blocks (heads never); return the names frozen."""
    units = blocks(model)  # the head counts, as in the prototype, but is never frozen
    heads = head_names(model)
    count = math.floor(ratio * len(units) + 1e-9)
    frozen = []
    for block in units[:count]:
        if holds_head(block.name, heads):
            continue
        for p in [*block.module.parameters(), *block.loose]:
            p.requires_grad_(False)
        block.module.eval()
        frozen.append(block.name)
    log.debug("%s: %d blocks in freezing order: %s", name, len(units),
              ", ".join(b.name for b in units))
    model._thumbclf_frozen = frozen  # type: ignore[attr-defined]
    return frozen


def train_mode(model: nn.Module) -> None:
    """model.train(), but frozen blocks stay in eval mode (BatchNorm statistics kept)."""
    model.train()
    frozen = set(getattr(model, "_thumbclf_frozen", ()))
    for block_name, block in model.named_modules():
        if block_name in frozen:
            block.eval()


def warn_untrained(ratio: float, *, trained: bool) -> None:
    """A freezeRatio above 0 without trained starting weights freezes random layers: say so."""
    if ratio > 0 and not trained:
        log.warning("freezeRatio %.2f with pretrained: false freezes the first layers at their "
                    "random initialisation, so they never learn; set freezeRatio: 0 (the default "
                    "without pretrained weights) or use pretrained weights", ratio)
