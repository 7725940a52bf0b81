"""Grad-CAM overlays: where in a thumbnail the model looked for its decision."""

from __future__ import annotations

import html
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from thumbclf.core import layout
from thumbclf.core.decide import UNDECIDED
from thumbclf.core.errors import ImageReadError, clean
from thumbclf.core.files import atomic_bytes, atomic_csv
from thumbclf.inputs.decode import load_array
from thumbclf.inputs.images import Preprocessing
from thumbclf.nn.data import Normalisation, to_input
from thumbclf.nn.models import head_names
from thumbclf.nn.freeze import blocks, holds_head
from thumbclf.outputs import report
from thumbclf.outputs.plots import image_grid, plt, save_figure
from thumbclf.core.table import DECISION, ERROR, LABEL, PATH

log = logging.getLogger(__name__)


def as_map(t: torch.Tensor) -> torch.Tensor | None:
    """A block's output as a spatial map (N, C, H, W): feature maps as they are, ViT tokens
    (N, 1 + h*w, C) without the class token on an h x w grid; None for anything else."""
    if t.dim() == 4 and t.shape[2] * t.shape[3] > 1:
        return t
    if t.dim() == 3:
        side = math.isqrt(t.shape[1] - 1)
        if side > 1 and side * side == t.shape[1] - 1:
            return t[:, 1:].transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)
    return None


def gradcam(model: nn.Module, arch: str, x: torch.Tensor, class_index: int) -> np.ndarray:
    """Grad-CAM heat map in [0, 1] (H x W of the input) for one normalised image (1, 3, H, W).

    The target is the last block (in freezeRatio's order, heads excluded) whose output is a
    spatial map that the class score depends on: ResNet's layer4, VGG's last convolution, a
    ViT's tokens entering its last encoder layer (the last layer's own patch tokens do not
    reach the class token).
    """
    heads = head_names(model)
    names: list[str] = []
    outputs: list[torch.Tensor] = []

    def keeper(name: str):
        def keep(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.requires_grad \
                    and as_map(output) is not None:
                names.append(name)
                outputs.append(output)
        return keep

    hooks = [b.module.register_forward_hook(keeper(b.name)) for b in blocks(model)
             if not holds_head(b.name, heads)]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = x.clone().requires_grad_(True)  # frozen layers: let gradients reach the target
            score = model(x)[0, class_index]
            grads = torch.autograd.grad(score, outputs, allow_unused=True) if outputs else ()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    cam = torch.zeros(1, 1, *x.shape[-2:])
    for name, act, grad in reversed(list(zip(names, outputs, grads))):
        grad_map = as_map(grad) if grad is not None else None
        if grad_map is not None and bool(grad_map.abs().sum() > 0):
            log.debug("Grad-CAM target of %s: %s %s", arch, name, tuple(act.shape))
            act_map = as_map(act.detach())
            weights = grad_map.mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights * act_map).sum(dim=1, keepdim=True)).float()
            break
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    return (cam / cam.max()).cpu().numpy() if float(cam.max()) > 0 else cam.cpu().numpy()


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heat map (jet colours) blended onto the RGB image."""
    colours = matplotlib.colormaps["jet"](cam)[..., :3]
    return np.clip((1 - alpha) * image / 255.0 + alpha * colours, 0, 1)


def select(table: pd.DataFrame, classes: list[str], per_class: int) -> pd.DataFrame:
    """The most confident decided images of each class, plus the most uncertain Undecided ones."""
    ok = table[table[ERROR].fillna("") == ""] if ERROR in table.columns else table
    ok = ok.assign(_conf=ok[classes].max(axis=1))
    parts = [ok[ok[DECISION] == c].nlargest(per_class, "_conf") for c in classes]
    parts.append(ok[ok[DECISION] == UNDECIDED].nsmallest(per_class, "_conf"))
    return pd.concat(parts)


@dataclass(frozen=True)
class GradcamSpec:
    """How the Grad-CAM overlays are made (issue 32): the models' input (``prep``, ``norm``),
    their architecture, how many images per class (0: none), the device and the run's slide
    thumbnail cache."""

    prep: Preprocessing
    norm: Normalisation
    arch: str
    per_class: int
    device: torch.device
    slide_cache: Path | None = None


def write_gallery(models: dict, table: pd.DataFrame, classes: list[str], spec: GradcamSpec,
                  out: Path) -> Path | None:
    """Grad-CAM PNGs per selected image (gradcam/<decision>/) and one overview figure.

    ``models`` maps a fold number (0: full training or deployment) to its model; a row uses
    its fold's model.
    """
    prep, norm, device = spec.prep, spec.norm, spec.device
    if spec.per_class <= 0 or table.empty:
        return None
    chosen = select(table, classes, spec.per_class)
    if chosen.empty:
        return None
    panels, written = [], []
    folders = layout.component_map([*classes, UNDECIDED, *chosen[DECISION].astype(str)])
    taken: set[str] = set()
    for _, row in chosen.iterrows():
        model = models.get(int(row["fold"]) if "fold" in row else 0) or next(iter(models.values()))
        try:
            img = load_array(Path(row[PATH]), prep, slide_cache=spec.slide_cache)
        except ImageReadError:
            continue
        x = to_input(torch.from_numpy(img[None].copy()), norm, device, channels_last=prep.recipe != "legacy")
        probs = row[classes].to_numpy(dtype=float)
        target = int(np.argmax(probs))
        cam = gradcam(model.to(device), spec.arch, x, target)
        blended = overlay(img, cam)
        decision = str(row[DECISION])
        name = Path(row[PATH]).stem
        png = layout.unique_file(out / layout.GRADCAM / folders[decision], name, ".png",
                                 str(row[PATH]), taken)
        buf = io.BytesIO()
        plt.imsave(buf, blended, format="png")
        atomic_bytes(buf.getvalue(), png)
        written.append((str(row[PATH]), png.relative_to(out).as_posix()))
        panels.append((blended, row.get(LABEL), decision, classes[target], probs[target], name))
    if not panels:
        return None
    atomic_csv(pd.DataFrame(written, columns=[PATH, "overlay"]), out / layout.GRADCAM_INDEX)
    fig, axes = image_grid(len(panels))
    for ax, (img, label, decision, target, p, name) in zip(axes, panels):
        ax.imshow(img)
        head = f"true: {clean(label)}\n" if isinstance(label, str) and label else ""
        # names and labels that are not UTF-8 (surrogates) are shown escaped (issue 33)
        ax.set_title(f"{head}{clean(decision)} (map for {clean(target)}, {p:.2f})", fontsize=7)
        ax.text(0.5, -0.04, clean(name)[:28], transform=ax.transAxes, ha="center", va="top",
                fontsize=6)
    fig.suptitle("Grad-CAM: where the model looked (red = most important)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out / layout.PLOTS / layout.FIG_GRADCAM)


def section(out: Path, table: pd.DataFrame, models: dict[int, nn.Module], classes: list[str],
            spec: GradcamSpec, *, note: str) -> list[tuple[str, str]]:
    """Grad-CAM overlays as a report section (none when ``per_class`` is 0).

    ``models`` maps a fold to its model (0: full training or deployment); a row of a fold uses
    that fold's model. ``note`` says which model made the overlays.
    """
    if spec.per_class <= 0:
        return []
    fig = write_gallery(models, table, classes, spec, out)
    if fig is None:
        return []
    return [("Grad-CAM", report.img(fig, "Grad-CAM") + "<p class=muted>Where the model looked: "
             "the most confident slides of each decision and the least certain Undecided ones, "
             f"{html.escape(note)}; one PNG per slide in gradcam/&lt;decision&gt;/.</p>")]
