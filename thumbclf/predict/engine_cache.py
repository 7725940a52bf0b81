"""The engine cache's integrity: a verdict of the quality gate is bound to the converted files it
verified (their hashes), to the model file it was made from (its hash) and to its cache key
(the folder and verdict names), and to itself (a seal), checked on every use; anything else is
converted and verified again. A copied entry (another model's engine and verdict put under this
model's key) does not describe this model and is not trusted (issue 33).

The seal is a hash, not a signature: it catches copies, swaps, corruption and stale entries;
someone who may write the cache and recompute hashes can still forge an entry (docs:
concepts/security.md)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from thumbclf.core.files import file_digest

log = logging.getLogger(__name__)


def engine_files(folder: Path) -> dict[str, str]:
    """The sha256 of every file of a converted engine (model.xml, model.bin); {} when absent."""
    if not folder.is_dir():
        return {}
    return {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file()}


def binding(model_file: Path, folder: Path, verdict_file: Path) -> dict:
    """What a verdict is about: the model file's hash and the entry's cache key."""
    return {"model": file_digest(model_file), "engine": folder.name, "verdict": verdict_file.stem}


def _seal(verdict: dict) -> str:
    body = {k: v for k, v in verdict.items() if k != "seal"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def sealed(verdict: dict, folder: Path, bound: dict) -> dict:
    """The verdict bound to what it verified (the engine files' hashes) and to what it is about
    (``bound``: binding()), and a hash of it all."""
    out = {**verdict, "files": engine_files(folder), "bound": bound}
    return {**out, "seal": _seal(out)}


def clear(folder: Path) -> bool:
    """Remove a cache entry's engine folder (a link: the link itself, never its target); True
    when nothing is left there (an entry that cannot be removed, in a shared cache, is not
    used: False)."""
    try:
        if folder.is_symlink() or folder.is_file():
            folder.unlink()
        elif folder.is_dir():
            shutil.rmtree(folder)
    except OSError as exc:
        log.warning("cache %s: cannot be removed (%s); the engine there is not used",
                    folder, exc.strerror or exc)
    return not (folder.exists() or folder.is_symlink())


def cached_verdict(verdict_file: Path, folder: Path, what: str, bound: dict) -> dict | None:
    """A cached verdict that still describes the engine files beside it and this model
    (``bound``), checked on every use; None (with the engine removed, to be converted and
    verified again, and a warning saying so) when it is unreadable, altered, copied from
    another entry, or the files changed since."""
    if not verdict_file.is_file() and not verdict_file.is_symlink():
        return None
    try:
        verdict = None if verdict_file.is_symlink() else json.loads(verdict_file.read_text())
        ok = isinstance(verdict, dict) and verdict.get("seal") == _seal(verdict)
    except (OSError, ValueError):
        verdict, ok = None, False
    if not ok:
        why = "its verdict is unreadable or was altered"
    elif verdict.get("bound") != bound:
        why = "its verdict is about another model or cache entry (copied)"
    elif folder.is_symlink():
        why = "its folder is a link"
    else:
        now = engine_files(folder)
        changed = sorted(set(now) ^ set(verdict["files"]) |
                         {k for k in now if verdict["files"].get(k) != now[k]})
        if not changed:
            return verdict
        why = f"{', '.join(changed)} changed since it was verified"
    log.warning("cache %s: the %s engine is not the one verified (%s); converting and verifying "
                "it again", folder, what, why)
    clear(folder)
    verdict_file.unlink(missing_ok=True)
    return None
