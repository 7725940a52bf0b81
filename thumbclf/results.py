"""The results folder: refuse to overwrite, atomic writes, run.log."""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .errors import OutputError

log = logging.getLogger(__name__)


SETUP_ONLY = {"run.log", "config.yaml", ".write-test"}  # a run that never got going


def prepare_output(folder: Path, *, resume: bool) -> None:
    """Create the results folder; refuse one with results in it unless resuming.

    A folder holding only what a failed start leaves (run.log, config.yaml, the experiment
    copy, caches) is reused, so fixing the input and running again just works.
    """
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder; choose another --output")
    if folder.is_dir() and not resume and any(p.name not in SETUP_ONLY and not
                                              p.name.startswith("experiment.")
                                              for p in folder.iterdir()):
        raise OutputError(f"{folder}: results folder is not empty; thumbclf never overwrites a "
                          "run. Use --resume to continue it, or --output NEW_FOLDER")
    if resume and not folder.is_dir():
        raise OutputError(f"{folder}: nothing to resume (no such results folder); run without "
                          "--resume")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write the results folder ({exc.strerror or exc}); "
                          "choose a writable --output") from None


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc}); is the disk full or "
                          "the folder read-only?") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_bytes(data: bytes, path: Path) -> None:
    """Write bytes so that a crash never leaves a half-written file."""
    _atomic(path, lambda f: f.write(data))


def atomic_text(text: str, path: Path) -> None:
    atomic_bytes(text.encode("utf-8"), path)


def atomic_csv(df: pd.DataFrame, path: Path) -> None:
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    atomic_text(buf.getvalue(), path)


def atomic_yaml(data: Any, path: Path) -> None:
    atomic_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_bytes(buf.getvalue(), path)


def copy_verified(src: Path, dst: Path) -> None:
    """Copy (never move) ``src`` to ``dst`` atomically and check the size of the copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        shutil.copy2(src, tmp)
        if tmp.stat().st_size != src.stat().st_size:
            raise OutputError(f"{dst}: copy is incomplete (size differs from {src})")
        os.replace(tmp, dst)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{dst}: cannot copy {src} ({exc.strerror or exc})") from None


def write_config(params, folder: Path, resume: bool) -> None:
    """config.yaml (resolved params) and a verbatim copy of the experiment file.

    On --resume the settings must equal the interrupted run's.
    """
    from .config import params_to_dict
    from .errors import ConfigError

    resolved = params_to_dict(params)
    resolved.pop("output", None)
    cfg = folder / "config.yaml"
    if resume and cfg.is_file():
        old = yaml.safe_load(cfg.read_text())
        changed = sorted(k for k in set(old) | set(resolved)
                         if old.get(k) != resolved.get(k) and k != "source")
        if changed:
            raise ConfigError(f"{params.source}: differs from the interrupted run in "
                              f"{', '.join(changed)}; --resume needs the same settings (or start "
                              "a new run with --output)")
        return
    atomic_yaml(resolved, cfg)
    atomic_bytes(params.source.read_bytes(), folder / f"experiment{params.source.suffix}")


def setup_logging(folder: Path | None, *, quiet: bool = False, debug: bool = False) -> None:
    """INFO (WARNING if quiet) to the console; DEBUG to <folder>/run.log."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_thumbclf", False):
            root.removeHandler(h)
            h.close()
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler()
    console.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter("%(message)s"))
    console._thumbclf = True  # type: ignore[attr-defined]
    root.addHandler(console)
    if folder is not None:
        fh = logging.FileHandler(folder / "run.log", encoding="utf-8")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fh._thumbclf = True  # type: ignore[attr-defined]
        root.addHandler(fh)
    for noisy in ("PIL", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
