"""The pretraining workflow, top to bottom: unlabelled samples -> cache -> BYOL epochs (a
checkpoint after each) -> BatchNorm statistics -> SSL checkpoint, history and loss curve.

Its checkpoint starts a training run with ``SSL: true`` and ``modelAdr: <this results folder>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from thumbclf.config import PretrainParams
from thumbclf.core import layout
from thumbclf.core.backbones import arch_name
from thumbclf.core.errors import DataError
from thumbclf.core.files import atomic_csv, atomic_text, atomic_torch_save
from thumbclf.core.seeds import Streams
from thumbclf.core.version import __version__
from thumbclf.inputs.images import Preprocessing
from thumbclf.inputs.samples import discover
from thumbclf.nn.data import IMAGENET, training_batches
from thumbclf.nn.training import configure_threads, pick_device, recalibrate_bn
from thumbclf.nn.models import SSL_CHECKPOINT, backbone_only, read_weights, save_ssl_checkpoint
from thumbclf.nn.models import input_size as arch_input_size
from thumbclf.nn.ssl import BYOL, PretrainSpec, pretrain
from thumbclf.outputs.plots import pretrain_loss
from thumbclf.workflows.run import write_config
from thumbclf.workflows.prepare import load_images, preflight_common

log = logging.getLogger(__name__)
CHECKPOINT = layout.CHECKPOINT  # training state after the last finished epoch; gone when done
BN_IMAGES = 512  # unaugmented images for the final BatchNorm statistics


def _digest(paths: list[str]) -> str:
    return hashlib.sha1("\n".join(paths).encode()).hexdigest()


def preflight(params: PretrainParams) -> None:
    """What can be checked before the results folder is written (as for training)."""
    preflight_common(params)


def run(params: PretrainParams, *, resume: bool = False, progress: bool = True,
        input_size: int | None = None) -> Path:
    """Pretrain a backbone as the experiment file says; return the results folder.

    ``input_size`` overrides the architecture's input size (benchmarks and tests only: a
    checkpoint made at another size is refused by training).
    """
    folder = params.output
    started = time.perf_counter()
    sample_set = discover(params.thumb_data, need_labels=False)
    write_config(params, folder, resume)
    ckpt_file = folder / CHECKPOINT
    if resume and (folder / SSL_CHECKPOINT).is_file() and not ckpt_file.is_file():
        log.info("pretraining finished earlier: %s", folder / SSL_CHECKPOINT)
        return folder
    log.info("%d images for self-supervised pretraining (labels, if any, are not used)",
             len(sample_set))
    device = pick_device(params.device)
    configure_threads(device)
    log.info("device: %s%s", device,
             f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
    arch = arch_name(params.model_name)
    prep = Preprocessing(size=input_size or arch_input_size(arch),
                         max_pixels=params.max_image_pixels, slide_size=params.slide_thumbnail_size,
                         slide_budget_s=params.slide_budget_s)
    decoded = load_images(params, sample_set, prep, folder, mode=params.cache,
                          max_failed=params.max_failed_fraction, progress=progress)
    positions = np.flatnonzero(decoded.ok)
    if len(positions) < 2:
        raise DataError(f"{params.thumb_data}: pretraining needs at least 2 readable images; "
                        f"found {len(positions)}")
    digest = _digest([str(sample_set.samples[i].path) for i in positions])
    train_start = time.perf_counter()
    learner, history = _byol(params, folder, decoded, positions, digest, arch=arch,
                             device=device, resume=resume, progress=progress)
    train_seconds = time.perf_counter() - train_start
    _finish(params, folder, learner, history, decoded, positions, arch=arch, prep=prep,
            device=device)
    timings = {"decode_seconds": round(decoded.seconds, 3),
               "pretrain_seconds_this_session": round(train_seconds, 3),
               "pretrain_seconds_all_epochs": round(float(sum(r["seconds"] for r in history)), 3),
               "total_seconds": round(time.perf_counter() - started, 3),
               "images": int(len(positions))}
    atomic_text(json.dumps(timings, indent=1), folder / layout.TIMINGS)
    ckpt_file.unlink(missing_ok=True)  # finished: the SSL checkpoint is what remains
    log.info("SSL checkpoint: %s (%s, %d epochs, %d images, %.0fs); train from it with "
             "SSL: true and modelAdr: %s", folder / SSL_CHECKPOINT, arch, len(history),
             len(positions), time.perf_counter() - started, folder)
    return folder


def _byol(params: PretrainParams, folder: Path, decoded, positions: np.ndarray, digest: str, *,
          arch: str, device: torch.device, resume: bool, progress: bool) -> tuple[BYOL, list[dict]]:
    """The BYOL epochs, a checkpoint after each (continued from it on --resume)."""
    ckpt_file = folder / CHECKPOINT
    bs = min(params.batch_size, len(positions))
    steps = len(positions) // bs + (1 if len(positions) % bs > 1 else 0)  # batches of 1 dropped
    streams = Streams.pretraining(params.seed)
    torch.manual_seed(streams.init)
    rng, gen = streams.batches(), streams.augmentation()
    backbone, features = backbone_only(arch, params.pretrained)
    learner = BYOL(backbone, features, params.projection_dim)
    learner = learner.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(learner.online_parameters(), lr=params.lr, weight_decay=params.wd)
    no_labels = np.zeros(len(decoded.rows), dtype=np.int64)
    log.info("%s on %s: %d images, batch %d (two views each), %d steps per epoch, %d epochs",
             params.ssl_method.upper(), arch, len(positions), bs, steps, params.max_epochs)

    def save_checkpoint(state: dict) -> None:  # every epoch, with the random generators
        state.update(np_rng=json.dumps(rng.bit_generator.state), torch_gen=gen.get_state(),
                     torch_rng=torch.get_rng_state(), images=digest)
        atomic_torch_save(state, ckpt_file)
        atomic_csv(pd.DataFrame(state["history"]), folder / layout.HISTORY)

    resume_state = None
    if resume and ckpt_file.is_file():
        resume_state = read_weights(ckpt_file, "checkpoint of the interrupted pretraining")
        if resume_state.get("images") != digest:
            raise DataError(f"{params.thumb_data}: the readable images differ from those of the "
                            f"interrupted run in {folder}; restore them or start a new run with "
                            "--output")
        rng.bit_generator.state = json.loads(resume_state["np_rng"])
        gen.set_state(resume_state["torch_gen"])
        torch.set_rng_state(resume_state["torch_rng"])
    elif resume:
        log.info("no checkpoint in %s: starting at epoch 1", folder)
    spec = PretrainSpec(
        batches=lambda: training_batches(decoded, positions, no_labels, batch_size=bs, rng=rng),
        steps_per_epoch=steps, max_epochs=params.max_epochs, optimizer=optimizer, lr=params.lr,
        base_momentum=params.momentum, norm=IMAGENET, device=device, gen=gen)
    history = pretrain(learner, spec, progress=progress, on_epoch=save_checkpoint,
                       resume=resume_state)
    return learner, history


def _finish(params: PretrainParams, folder: Path, learner: BYOL, history: list[dict], decoded,
            positions: np.ndarray, *, arch: str, prep: Preprocessing,
            device: torch.device) -> None:
    """BatchNorm statistics for the images training will see (unaugmented, not the views);
    the SSL checkpoint, the history and the loss curve."""
    bs = min(params.batch_size, len(positions))
    no_labels = np.zeros(len(decoded.rows), dtype=np.int64)
    sample = Streams.pretraining(params.seed).bn_sample().permutation(positions)[:BN_IMAGES]
    learner.backbone.train()
    recalibrate_bn(learner.backbone, training_batches(
        decoded, sample, no_labels, batch_size=bs, rng=None),
        norm=IMAGENET, device=device, max_images=BN_IMAGES)
    learner.backbone.eval()
    description = {
        "method": params.ssl_method, "epochs": len(history), "images": int(len(positions)),
        "final_loss": float(history[-1]["loss"]) if history else None,
        "thumbclf_version": __version__,
        "settings": {"projection_dim": params.projection_dim, "momentum": params.momentum,
                     "lr": params.lr, "wd": params.wd, "batch_size": bs, "seed": params.seed,
                     "pretrained": str(params.pretrained)},
    }
    save_ssl_checkpoint(folder / SSL_CHECKPOINT, learner.backbone, arch=arch, prep=prep,
                        norm=IMAGENET, description=description)
    history_df = pd.DataFrame(history)
    atomic_csv(history_df, folder / layout.HISTORY)
    pretrain_loss(history_df, folder / layout.PLOTS / layout.FIG_PRETRAIN_LOSS, params.ssl_method.upper())
