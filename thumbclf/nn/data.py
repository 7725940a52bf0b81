"""Tensors from images: normalisation, batch augmentation, training batches and the
streaming deployment loader."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from thumbclf.core.errors import ImageReadError, ReadFailure
from thumbclf.inputs.cache import DecodedImages
from thumbclf.inputs.decode import load_array
from thumbclf.inputs.images import Preprocessing
from thumbclf.nn import look


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
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2)
    # laid out first, then converted and normalised in place: the same arithmetic in the same
    # order (identical values) without the three temporary copies (issue 29)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
    mean = torch.tensor(norm.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, device=device).view(1, 3, 1, 1)
    x = x.float() if x.dtype != torch.float32 else x.clone()  # never the caller's tensor
    return x.div_(255.0).sub_(mean).div_(std)


def training_batches(images: DecodedImages, positions: np.ndarray, targets: np.ndarray, *,
                     batch_size: int, rng: np.random.Generator | None,
                     weights: np.ndarray | None = None, drop_single: bool = True,
                     shard=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 image batches and class targets from the cache: shuffled by ``rng``, in order
    without one; ``weights`` = balanced sampling (drawn by ``rng``); ``shard(selection)``: this
    process's part of a batch (None: skip it), for DDP."""
    positions = np.asarray(positions)
    if weights is not None:
        if rng is None:
            raise ValueError("weighted sampling draws with a random generator; pass rng")
        p = weights / weights.sum()
        order = rng.choice(len(positions), size=len(positions), replace=True, p=p)
    elif rng is not None:
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
            return i, None, ReadFailure.of(exc)
        except Exception as exc:  # noqa: BLE001 - one bad file must not end a deploy
            return i, None, ReadFailure(f"{self.paths[i]}: unexpected error "
                                        f"({type(exc).__name__}: {exc})")


def collate(items, size: int, *, looks: bool = False):
    """Decoded items -> (positions, uint8 images, errors, look measures or None): with
    ``looks``, look.measured of the batch, computed where the batch is assembled (a decoding
    worker), beside the decoding rather than in the process that runs the model."""
    pos = torch.tensor([i for i, _, _ in items], dtype=torch.long)
    arrays = [a if a is not None else np.full((size, size, 3), 255, np.uint8) for _, a, _ in items]
    images = torch.from_numpy(np.stack(arrays))
    return pos, images, [e for _, _, e in items], look.measured(images) if looks else None


class _Collate:
    def __init__(self, size: int, looks: bool):
        self.size, self.looks = size, looks

    def __call__(self, items):
        return collate(items, self.size, looks=self.looks)


def stream_loader(paths: list[Path], prep: Preprocessing, *, batch_size: int, workers: int,
                  pin_memory: bool, slide_cache: Path | None = None,
                  looks: bool = False) -> DataLoader:
    """A DataLoader that decodes in ``workers`` processes while the model runs; bounded memory.
    Batches: (positions, uint8 images, errors, look measures or None: ``collate``)."""
    ds = FileImages(paths, prep, slide_cache)
    kwargs = {}
    if workers > 0:
        kwargs = {"prefetch_factor": max(2, math.ceil(4 / workers)), "persistent_workers": False}
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=_Collate(prep.size, looks), pin_memory=pin_memory, **kwargs)
