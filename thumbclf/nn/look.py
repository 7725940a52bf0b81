"""How a thumbnail looks, apart from what it shows: tissue, glass, stain and texture.

Two things of the decision step come from here (issue 28):

- **No tissue.** A blank slide, a slide with only pen or a label, or almost no tissue is
  Undecided with the reason ``no tissue``, whatever the model says. Tissue is measured as the
  quality-control tools do, on the thumbnail the model sees, in optical density (OD): a pixel is
  tissue where it is darker than the slide's glass (OD above the glass's by ``TISSUE_OD``) and
  coloured (its OD vector more than ``TISSUE_ANGLE_DEG`` from grey), but not black (mean OD
  below ``PEN_OD``). Grey and black pen, dust, shadows and dark borders are not tissue; the
  stains (haematoxylin, eosin, DAB, special stains) are. Below decide.NO_TISSUE_FRACTION (0.2%
  of the thumbnail, a fragment of about 10 x 10 pixels at 224 px) a slide has no tissue.
  Glass is the median colour of the slide's brightest 1% (pure white, the padding that makes
  a thumbnail square, left out).
- **The look statistics** that the unfamiliar-slide rule scores next to the model's own
  features (familiarity.py): how much tissue there is, the colour of the glass, the stain's mean
  and spread in OD, the texture (the median local contrast of OD inside the tissue, at two
  scales: real tissue has structure everywhere, a drawing flat areas) and the share of dark
  pixels. They carry stain, scanner and rendering, which a classifier's penultimate features are
  trained to ignore, so a slide from another world (a fluorescence scan, another lab's stain,
  a real slide for a model trained on drawings) is seen even when its content looks familiar.

Everything is computed on the batch the model receives (uint8), on every second pixel of
every second row where it is 224 px or more, in torch: milliseconds a batch. A deploy measures
them in its decoding workers, on the batch they assemble (``measured``: data.collate), so that
the process running the model does not (they were 11-12% of its time on the bf16 path).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from thumbclf.nn.augment import augment

TISSUE_OD = 0.15  # OD (summed over R, G, B) above the glass's
TISSUE_ANGLE_DEG = 8.1  # angle of the OD vector from grey: colour, not grey or black pen
PEN_OD = 1.5  # mean OD above which a pixel is black (pen, label, border), not tissue
GLASS_BRIGHTNESS = 0.75  # the brightest 1% of a slide is its glass when at least this bright
NAMES = ("tissue (log)", "glass R", "glass G", "glass B", "stain OD R", "stain OD G",
         "stain OD B", "stain spread R", "stain spread G", "stain spread B", "texture (log)",
         "coarse texture (log)", "dark pixels (log)")  # the look statistics, in order
_COS = math.cos(math.radians(TISSUE_ANGLE_DEG))


_OD = -torch.log((torch.arange(256, dtype=torch.float32) + 1) / 256)  # OD of each 8-bit value


def _small(batch: torch.Tensor) -> torch.Tensor:
    """uint8 images (n, H, W, 3), every second pixel of every second row from 128 px on: the
    statistics are of the whole thumbnail, and this keeps them to milliseconds a batch."""
    step = max(1, min(batch.shape[1], batch.shape[2]) // 112)
    return batch[:, ::step, ::step]


def glass(x: torch.Tensor) -> torch.Tensor:
    """Each slide's glass colour (n, 3) in [0, 1] from float images (n, 3, P): the median colour
    of its brightest 1% of pixels, or white where even those are dark (a slide covered in
    tissue, a fluorescence scan)."""
    brightness = x[:, 0] + x[:, 1] + x[:, 2]
    brightness = brightness.masked_fill(brightness >= 3 * 254 / 255, -1.0)  # the white the
    # thumbnail is padded with to a square, or glass clipped to white: no colour to measure
    k = max(1, x.shape[2] // 100)
    top = brightness.topk(k, dim=1, sorted=False).indices
    colour = x.gather(2, top[:, None, :].expand(-1, 3, -1)).median(2).values
    is_glass = colour.mean(1, keepdim=True) >= GLASS_BRIGHTNESS  # (also where all is white)
    return torch.where(is_glass, colour, torch.ones_like(colour))


def _tissue(x: torch.Tensor, od: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tissue pixels (n, P) of float images (n, 3, P) in [0, 1] with their OD; the glass colour.
    (Channels are added one by one: a reduction over a middle axis of 3 is slow on CPUs.)"""
    colour = glass(x)
    glass_od = -torch.log((colour * 255 + 1) / 256)
    r, g, b = od[:, 0], od[:, 1], od[:, 2]
    above = ((r - glass_od[:, 0:1]).clamp_min(0) + (g - glass_od[:, 1:2]).clamp_min(0)
             + (b - glass_od[:, 2:3]).clamp_min(0))
    total = r + g + b
    squares = r * r + g * g + b * b
    # the angle to grey above TISSUE_ANGLE_DEG: total / (sqrt(3) |od|) < cos, squared (od >= 0)
    coloured = total * total < 3 * _COS * _COS * squares
    return (above > TISSUE_OD) & coloured & (total < 3 * PEN_OD), colour


def tissue_fraction(batch: torch.Tensor) -> np.ndarray:
    """The share of each uint8 image (n, H, W, 3) that is tissue."""
    return describe(batch)[1]


@torch.no_grad()
def describe(batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The look statistics (n, len(NAMES)) and the tissue fraction (n,) of uint8 images
    (n, H, W, 3), as the model receives them."""
    small = _small(batch.cpu()).permute(0, 3, 1, 2).contiguous()  # (n, 3, h, w)
    n, _, h, w = small.shape
    od = _OD[small.long()].reshape(n, 3, h * w)
    x = small.reshape(n, 3, h * w).float().div_(255.0)
    tissue, colour = _tissue(x, od)
    tissue = tissue.float()
    weight = tissue.sum(1)
    fraction = weight / (h * w)
    weight = weight.clamp_min(1.0)[:, None]
    weighted = od * tissue[:, None]
    mean = weighted.sum(2) / weight
    spread = ((od * weighted).sum(2) / weight - mean ** 2).clamp_min(0).sqrt()
    total = (od[:, 0] + od[:, 1] + od[:, 2]).reshape(n, 1, h, w)
    where = tissue.reshape(n, 1, h, w)
    fine = _texture(total, where > 0)
    coarse = _texture(F.avg_pool2d(total, 2), F.avg_pool2d(where, 2) > 0.99)
    dark = (torch.maximum(torch.maximum(x[:, 0], x[:, 1]), x[:, 2]) < 0.2).float().mean(1)
    stats = torch.cat([torch.log(fraction[:, None] + 0.01), colour, mean, spread,
                       torch.log(fine[:, None] + 0.01), torch.log(coarse[:, None] + 0.01),
                       torch.log(dark[:, None] + 0.01)], dim=1)
    return stats.numpy().astype(np.float64), fraction.numpy().astype(np.float64)


def measured(batch: torch.Tensor) -> np.ndarray:
    """describe's look statistics and tissue fraction side by side, (n, len(NAMES) + 1): what
    a decoding worker measures on the batch it assembles, so that the process computing the
    model does not (issue 29; ``parts`` splits them again)."""
    stats, fraction = describe(batch)
    return np.concatenate([stats, fraction[:, None]], axis=1)


def parts(measures: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The look statistics (n, len(NAMES)) and tissue fractions (n,) of ``measured``."""
    measures = np.asarray(measures, dtype=np.float64)
    return measures[:, :len(NAMES)], measures[:, len(NAMES)]


def _texture(od: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """The median local contrast (|dOD/dx| + |dOD/dy|) of OD (n, 1, H, W) over the pixels
    ``where`` (tissue): real tissue has structure everywhere, a drawing flat areas and edges,
    which the median leaves out (0 where there is no tissue)."""
    contrast = ((od[..., 1:, :-1] - od[..., :-1, :-1]).abs()
                + (od[..., :-1, 1:] - od[..., :-1, :-1]).abs())[:, 0]
    inside = where[:, 0, :-1, :-1]
    masked = contrast.masked_fill(~inside, float("nan")).flatten(1)
    return masked.nanmedian(1).values.nan_to_num(0.0)


def of_images(get: Callable[[np.ndarray], np.ndarray], positions: np.ndarray, *,
              gen: torch.Generator | None = None, stain: float = 0.0, chunk: int = 64
              ) -> tuple[np.ndarray, np.ndarray]:
    """The look statistics and tissue fractions of the uint8 images ``get(positions)`` gives
    (the decode-once cache), in order; with ``gen``, of the images as training augments them
    (``stain``: its lab-to-lab strength), the looks a model learned to handle."""
    looks, tissue = [np.zeros((0, len(NAMES)))], [np.zeros(0)]
    positions = np.asarray(positions)
    for start in range(0, len(positions), chunk):
        x = torch.from_numpy(get(positions[start:start + chunk]))
        if gen is not None:
            x = augment(x, gen, stain)
        stats, fraction = describe(x)
        looks.append(stats)
        tissue.append(fraction)
    return np.concatenate(looks), np.concatenate(tissue)
