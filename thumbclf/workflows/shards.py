"""SLURM array shards of a deploy (issue 30): ``--shard I/N`` (or the array's own variables)
deploys the I-th of N shares of the inputs into ``shards/I-of-N/`` of the results folder.

The shares are stable: made from the input list and the inputs' sizes alone, so every node of
an array computes the same ones. They are balanced by size where it is known (largest first,
each to the lightest share: slides of 5 GB and of 50 MB spread evenly), and by count where it
is not. A shard folder is an ordinary deploy folder of its share plus ``shard.json`` (its
positions in the full input list, that list's digest, the keys given, finished or not), without
sorted copies or a report: ``thumbclf merge`` (merge.py) makes those once, for all.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from thumbclf.core import layout
from thumbclf.core.errors import ConfigError, OutputError
from thumbclf.core.files import atomic_text
from thumbclf.inputs.samples import SampleSet

log = logging.getLogger(__name__)
SLURM_ID, SLURM_COUNT, SLURM_MIN = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
                                    "SLURM_ARRAY_TASK_MIN")
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """The ``index``-th (from 1) of ``count`` shares; ``why`` says where it came from."""

    index: int
    count: int
    why: str = "--shard"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse(text: str) -> Shard:
    """``I/N`` -> Shard; ConfigError saying the rule otherwise."""
    m = _SPEC.match(str(text))
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ConfigError(f"--shard must be I/N with 1 <= I <= N (the I-th of N shares, e.g. "
                          f"--shard 2/4); got {text!r}")
    return Shard(int(m.group(1)), int(m.group(2)))


def from_environment(env: Mapping[str, str] | None = None) -> Shard | None:
    """The share of a SLURM array task (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN + 1 of
    SLURM_ARRAY_TASK_COUNT); None outside an array."""
    env = os.environ if env is None else env
    if SLURM_ID not in env or SLURM_COUNT not in env:
        return None
    try:
        task, count, first = (int(env[SLURM_ID]), int(env[SLURM_COUNT]),
                              int(env.get(SLURM_MIN, "0")))
    except ValueError:
        raise ConfigError(f"{SLURM_ID}={env[SLURM_ID]!r}, {SLURM_COUNT}={env[SLURM_COUNT]!r}: "
                          "not whole numbers; give the share with --shard I/N") from None
    index = task - first + 1
    if not 1 <= index <= count:
        raise ConfigError(f"{SLURM_ID}={task} with {SLURM_MIN}={first} and {SLURM_COUNT}={count} "
                          "is not one of the array's shares (an array with steps such as "
                          "--array=0-15:4?); submit --array=0-(N-1), or give --shard I/N")
    return Shard(index, count, f"{SLURM_ID}={task} of the SLURM array "
                               f"{first}-{first + count - 1}")


def resolve(given: str | None, env: Mapping[str, str] | None = None) -> Shard | None:
    """The share of this deploy: --shard when given, else the SLURM array's, else None."""
    return parse(given) if given else from_environment(env)


def folder_of(results: Path, shard: Shard | None) -> Path:
    """Where a share is deployed (the results folder itself without a shard)."""
    return results if shard is None else layout.shard_folder(results, shard.index, shard.count)


def input_size(path: Path) -> int | None:
    """Bytes of an input: a file, a DICOM folder's files, a MIRAX file and its data folder."""
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        size = path.stat().st_size
        data = path.with_suffix("")
        if path.suffix.lower() == ".mrxs" and data.is_dir():
            size += sum(p.stat().st_size for p in data.iterdir() if p.is_file())
        return size
    except OSError:
        return None


def shares(sizes: list[int | None], count: int) -> list[list[int]]:
    """Positions of each of ``count`` shares: largest input first, each to the share with the
    fewest bytes (then the fewest inputs, then the lowest index); an input of unknown size
    counts as the known ones' mean. The same sizes always give the same shares."""
    known = [s for s in sizes if s is not None]
    mean = sum(known) // len(known) if known else 0
    weight = [mean if s is None else s for s in sizes]
    heap = [(0, 0, j) for j in range(count)]
    out: list[list[int]] = [[] for _ in range(count)]
    for k in sorted(range(len(sizes)), key=lambda k: (-weight[k], k)):
        total, n, j = heapq.heappop(heap)
        out[j].append(k)
        heapq.heappush(heap, (total + weight[k], n + 1, j))
    return [sorted(o) for o in out]


def inputs_digest(sample_set: SampleSet) -> str:
    """sha256 of the full input list (paths in order), the same for every share."""
    text = "\n".join(str(s.path) for s in sample_set.samples)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def record_path(folder: Path) -> Path:
    return folder / layout.SHARD_RECORD


def read_record(folder: Path) -> dict | None:
    try:
        return json.loads(record_path(folder).read_text())
    except (OSError, ValueError):
        return None


def is_finished(folder: Path) -> bool:
    """A shard whose predictions are complete (shard.json says finished)."""
    rec = read_record(folder)
    return bool(rec and rec.get("finished")) and (folder / layout.PREDICTIONS).is_file()


def start(folder: Path, everything: SampleSet, shard: Shard, params) -> SampleSet:
    """This shard's share of the inputs; shard.json written (or checked against an
    interrupted run's)."""
    if getattr(params, "adapt_bn", False):
        raise ConfigError(f"{params.source}: adapt_bn re-estimates BatchNorm on the deploy's own "
                          "images, and each shard would adapt to its share alone; deploy without "
                          "--shard, or set adapt_bn: false")
    sizes = [input_size(s.path) for s in everything.samples]
    mine = shares(sizes, shard.count)[shard.index - 1]
    digest = inputs_digest(everything)
    before = read_record(folder)
    if before is not None and (before.get("inputs_sha256") != digest
                               or before.get("positions") != mine):
        raise OutputError(f"{folder}: this shard ran on other inputs or another share of them "
                          "(shard.json); restore the inputs, or deploy into a new --output")
    atomic_text(json.dumps({"shard": shard.index, "of": shard.count, "inputs": len(everything),
                            "inputs_sha256": digest, "positions": mine,
                            "given": sorted(params.given), "source": str(params.source),
                            "finished": False}), record_path(folder))
    log.info("shard %s (%s): %d of the %d inputs", shard, shard.why, len(mine), len(everything))
    return replace(everything, samples=tuple(everything.samples[k] for k in mine))


def finish(folder: Path, shard: Shard | None = None, rows: int = 0,
           results: Path | None = None) -> Path:
    """Mark a shard finished (its predictions.csv is complete); return its folder."""
    rec = read_record(folder) or {}
    atomic_text(json.dumps({**rec, "finished": True}), record_path(folder))
    if shard is not None:
        log.info("shard %s finished: %d rows in %s; when every shard has finished: thumbclf "
                 "merge %s", shard, rows, folder / layout.PREDICTIONS, results)
    return folder
