"""Tensors from images: normalisation, batch augmentation, training batches and the
streaming deployment loader."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from thumbclf.core.errors import ImageReadError
from thumbclf.inputs.cache import DecodedImages
from thumbclf.inputs.decode import load_array
from thumbclf.inputs.images import Preprocessing


@dataclass(frozen=True)
class Normalisation:
    """Per-channel mean and std applied after scaling pixels to [0, 1] (legacy: none)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET = Normalisation((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # thumbclf models
UNNORMALISED = Normalisation((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # the prototype's models


def to_input(batch: torch.Tensor, norm: Normalisation, device: torch.device,
             channels_last: bool = True) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> normalised float (n, 3, H, W) on ``device``."""
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(norm.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/rotations of images (…, H, W): k in 0..7."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


# Haematoxylin, eosin and DAB optical-density vectors (Ruifrok & Johnston 2001, as in
# scikit-image's rgb2hed); rows: stains, columns: R, G, B.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / RGB_FROM_HED.norm(dim=1, keepdim=True)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


def stain_shift(x: torch.Tensor, strength: float, u, gen: torch.Generator) -> torch.Tensor:
    """Another lab's look on float images (n, 3, H, W) in [0, 1], ``strength`` 0-1.

    - stain colour and strength: each image's haematoxylin, eosin and DAB amounts (colour
      deconvolution of optical density) scaled by up to ±40% x strength and shifted by up to
      ±0.08 x strength where there is tissue; glass (no stain) stays glass;
    - glass tint: every channel dimmed by up to 6% x strength (yellowish or bluish glass);
    - scanner blur (Gaussian, sigma up to 1.5 px x strength) and sensor noise (up to 3% x
      strength).
    ``u(lo, hi, *shape)`` draws the random parameters, ``gen`` the noise. JPEG artefacts:
    ``jpeg_artefacts``.
    """
    n, dev = x.shape[0], x.device
    od = -torch.log((x * 255 + 1) / 256)  # optical density; 0 on white glass
    hed = torch.einsum("nchw,cs->nshw", od, HED_FROM_RGB.to(dev)).clamp_min(0)
    tissue = od.sum(1, keepdim=True)
    tissue = tissue / (tissue + 0.15)  # ~0 on glass, ~1 in tissue
    hed = hed * u(1 - 0.4 * strength, 1 + 0.4 * strength, n, 3, 1, 1) \
        + u(-0.08 * strength, 0.08 * strength, n, 3, 1, 1) * tissue
    od = torch.einsum("nshw,sc->nchw", hed.clamp_min(0), RGB_FROM_HED.to(dev))
    x = (256 * torch.exp(-od) - 1) / 255
    x = x * u(1 - 0.06 * strength, 1.0, n, 3, 1, 1)  # glass tint
    sigma = float(u(0.0, 1.5 * strength, 1))
    if sigma > 0.3:
        radius = max(1, math.ceil(2 * sigma))
        t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=dev)
        kernel = torch.exp(-t ** 2 / (2 * sigma ** 2))
        kernel = (kernel / kernel.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
        x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
        x = F.conv2d(F.conv2d(x, kernel, groups=3), kernel.transpose(2, 3), groups=3)
    noise = u(0.0, 0.03 * strength, n, 1, 1, 1)
    x = x + noise * torch.randn(x.shape, generator=gen).to(dev)
    return x.clamp(0, 1)


def jpeg_artefacts(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """uint8 (n, 3, H, W): with probability strength / 2 each image is JPEG-compressed at a
    quality of 30-90 and decoded again."""
    from torchvision.io import decode_jpeg, encode_jpeg

    pick = torch.rand(x.shape[0], generator=gen) < strength / 2
    quality = torch.randint(30, 91, (x.shape[0],), generator=gen)
    if not pick.any():
        return x
    out = x.clone()
    for i in torch.nonzero(pick).flatten().tolist():
        img = x[i].cpu().contiguous()
        out[i] = decode_jpeg(encode_jpeg(img, quality=int(quality[i]))).to(x.device)
    return out


def augment(x: torch.Tensor, gen: torch.Generator, stain: float = 0.0) -> torch.Tensor:
    """Random flips, 90° rotations, mild colour/stain jitter and scale on uint8 (n, H, W, 3);
    ``stain`` > 0: also another lab's stain, glass, blur, noise and JPEG (stain_shift).

    Runs on whatever device ``x`` is on; random parameters come from the CPU ``gen``.
    """
    n = x.shape[0]
    ks = torch.randint(0, 8, (n,), generator=gen)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)  # n, 3, H, W in [0, 1]
    x = torch.stack([dihedral(x[i], int(ks[i])) for i in range(n)])
    dev = x.device

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:  # parameters drawn on the CPU
        return (lo + (hi - lo) * torch.rand(*shape, generator=gen)).to(dev)

    if stain > 0:
        x = stain_shift(x, stain, u, gen)

    # stain/colour: per-channel gain, brightness, contrast and saturation around 1
    x = x * u(0.95, 1.05, n, 3, 1, 1) * u(0.9, 1.1, n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.9, 1.1, n, 1, 1, 1) + mean
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * u(0.85, 1.15, n, 1, 1, 1) + grey
    # scale 0.9-1.1 about the centre, glass (white) where the picture moves in
    s = u(0.9, 1.1, n)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = 1 / s
    theta[:, 1, 1] = 1 / s
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = 1 - F.grid_sample(1 - x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = x.clamp_(0, 1).mul_(255.0).round_().to(torch.uint8)
    if stain > 0:
        x = jpeg_artefacts(x, stain, gen)
    return x.permute(0, 2, 3, 1).contiguous()


def training_batches(images: DecodedImages, positions: np.ndarray, targets: np.ndarray, *,
                     batch_size: int, rng: np.random.Generator, shuffle: bool = True,
                     weights: np.ndarray | None = None, drop_single: bool = True,
                     shard=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 image batches and class targets from the cache; ``weights`` = balanced sampling;
    ``shard(selection)``: this process's part of a batch (None: skip it), for DDP."""
    positions = np.asarray(positions)
    if weights is not None:
        p = weights / weights.sum()
        order = rng.choice(len(positions), size=len(positions), replace=True, p=p)
    elif shuffle:
        order = rng.permutation(len(positions))
    else:
        order = np.arange(len(positions))
    for start in range(0, len(order), batch_size):
        sel = order[start:start + batch_size]
        if drop_single and len(sel) == 1 and len(order) > 1:
            continue  # BatchNorm cannot train on a batch of one
        if shard is not None:
            sel = shard(sel)
            if sel is None:
                continue
        x = torch.from_numpy(images.get(positions[sel]))
        y = torch.from_numpy(np.asarray(targets)[positions[sel]]).long()
        yield x, y


class FileImages(Dataset):
    """Streams images from files for deployment: (position, uint8 image, error message)."""

    def __init__(self, paths: list[Path], prep: Preprocessing, slide_cache: Path | None = None):
        self.paths, self.prep, self.slide_cache = paths, prep, slide_cache

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, load_array(self.paths[i], self.prep, slide_cache=self.slide_cache), ""
        except ImageReadError as exc:
            return i, None, str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad file must not end a deploy
            return i, None, f"{self.paths[i]}: unexpected error ({type(exc).__name__}: {exc})"


def _collate(items, size: int):
    pos = torch.tensor([i for i, _, _ in items], dtype=torch.long)
    arrays = [a if a is not None else np.full((size, size, 3), 255, np.uint8) for _, a, _ in items]
    return pos, torch.from_numpy(np.stack(arrays)), [e for _, _, e in items]


class _Collate:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, items):
        return _collate(items, self.size)


def stream_loader(paths: list[Path], prep: Preprocessing, *, batch_size: int, workers: int,
                  pin_memory: bool, slide_cache: Path | None = None) -> DataLoader:
    """A DataLoader that decodes in ``workers`` processes while the model runs; bounded memory."""
    ds = FileImages(paths, prep, slide_cache)
    kwargs = {}
    if workers > 0:
        kwargs = {"prefetch_factor": max(2, math.ceil(4 / workers)), "persistent_workers": False}
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=_Collate(prep.size), pin_memory=pin_memory, **kwargs)
