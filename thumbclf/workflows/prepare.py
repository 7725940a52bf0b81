"""What training and pretraining both do before the first epoch: check the inputs, folders and
backbone, then decode every image once (the cache)."""

from __future__ import annotations

import logging
from pathlib import Path

from thumbclf.core.backbones import arch_name
from thumbclf.core.errors import DataError
from thumbclf.core.files import check_writable
from thumbclf.inputs import cache
from thumbclf.inputs.images import Preprocessing
from thumbclf.inputs.samples import SampleSet, check_input
from thumbclf.nn.models import build_model
from thumbclf.nn import distributed

log = logging.getLogger(__name__)


def load_images(params, sample_set: SampleSet, prep: Preprocessing, folder: Path, *,
                mode: str, max_failed: float | None, progress: bool):
    """Decode every image once; report failures; drop them (training) or keep them (deploy)."""
    cache_dir = params.cache_root
    paths = [s.path for s in sample_set.samples]

    def build():
        return cache.build(paths, prep, mode=mode, cache_dir=cache_dir,
                           slide_cache=params.slide_cache, workers=params.num_workers,
                           progress=progress)

    if distributed.active():  # decoded once, by rank 0, into the disk cache the others read
        mode = "disk"
        if distributed.is_main():
            decoded = build()
            distributed.barrier()
        else:
            distributed.barrier()
            decoded = build()
    else:
        decoded = build()
    n_fail = len(decoded.errors)
    if n_fail:
        for i, err in sorted(decoded.errors.items()):
            s = sample_set.samples[i]
            log.debug("unreadable: %s", f"row {s.row}: {err}" if s.row else err)
        first = sample_set.samples[min(decoded.errors)]
        log.warning("%d of %d images could not be read and are left out (first: %s%s); the "
                    "full list is in run.log", n_fail, len(paths),
                    f"row {first.row}: " if first.row else "", decoded.errors[min(decoded.errors)])
        if max_failed is not None and n_fail / len(paths) > max_failed:
            raise DataError(f"{sample_set.source}: {n_fail} of {len(paths)} images "
                            f"({n_fail / len(paths):.0%}) cannot be read, more than "
                            f"max_failed_fraction ({max_failed:.0%}); fix the inputs (see "
                            f"{folder / 'run.log'}) or raise max_failed_fraction")
    log.info("images ready in %.1fs", decoded.seconds)
    return decoded


def preflight_common(params) -> None:
    """Training and pretraining: inputs, results and cache folders, backbone and its
    pretrained weights (fetched now where they must be downloaded)."""
    check_input(params.thumb_data)
    check_writable(params.output, "results folder")
    check_writable(params.cache_root, "cache folder (cache_dir)")
    build_model(arch_name(params.model_name), 2,
                params.pretrained if not getattr(params, "ssl", False) else False)

