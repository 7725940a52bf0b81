"""One model trained by several processes (PyTorch DDP, launched with torchrun).

``torchrun --nproc_per_node=N train_thumbclassifier.py EXPERIMENT`` (or ``torchrun
--nproc_per_node=N -m thumbclf train EXPERIMENT``) starts N copies of the training; torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, ...) tells each who it is. Everything here is a no-op
in a plain single process, so the workflows read the same either way:

- every rank computes the same splits, draws the same order of each epoch's batches and trains
  on its own part of every batch (``shard``); DistributedDataParallel averages the gradients,
  so all ranks keep identical weights, and a batch of ``batch_size`` images is one optimiser
  step whatever the number of ranks (as in one process);
- the validation loss is averaged across ranks (``mean``), so early stopping and the best
  epoch are decided identically everywhere;
- BatchNorm: on CUDA the trainable BatchNorm layers become SyncBatchNorm (batch statistics over
  the whole batch, as in one process). On the CPU (gloo) PyTorch has no SyncBatchNorm: batch
  statistics are per rank during the epoch, and the running statistics used for prediction are
  re-estimated after every epoch on the same images by every rank with the same weights, so
  they agree (DDP also broadcasts rank 0's buffers at every forward pass);
- rank 0 owns the results folder: it alone locks it, writes files and logs to the console;
  it builds the decoded-image cache on disk, the others wait at a barrier and read it.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import numpy as np


def world_size() -> int:
    """Processes training together (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    """True under torchrun with more than one process."""
    return world_size() > 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and logs to the console."""
    return rank() == 0


def local_threads(cores: int) -> int:
    """CPU threads per process when several share one machine."""
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def init(device_name: str) -> Any:
    """Join the process group (NCCL with GPUs, gloo on the CPU); return this rank's device."""
    import torch
    import torch.distributed as dist

    from thumbclf.nn.training import pick_device

    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if active() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))  # rank 0 may decode long
    return device


def finish() -> None:
    import torch.distributed as dist

    if active() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def share(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not active():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if not active():
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def mean(value: float) -> float:
    """The average of ``value`` over all ranks (identical on every rank)."""
    if not active():
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def shard(selection: np.ndarray) -> np.ndarray | None:
    """This rank's part of one batch (every world_size-th image), or None to skip the batch on
    every rank (too small to give each rank two images, which BatchNorm needs)."""
    if not active():
        return selection
    if len(selection) < 2 * world_size():
        return None
    return selection[rank()::world_size()]


def wrap(model, device) -> tuple[Any, Any]:
    """(the model, what trains it): DDP around it (SyncBatchNorm on CUDA), or itself when alone."""
    if not active():
        return model, model
    import torch
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model, DistributedDataParallel(model, device_ids=[device.index])
    return model, DistributedDataParallel(model)
