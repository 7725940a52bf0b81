"""The engine cache's integrity: a verdict of the quality gate is bound to the converted files it
verified (their hashes) and to itself (a seal), checked on every use; anything else is
converted and verified again."""

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


def _seal(verdict: dict) -> str:
    body = {k: v for k, v in verdict.items() if k != "seal"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def sealed(verdict: dict, folder: Path) -> dict:
    """The verdict bound to what it verified: the engine files' hashes, and a hash of it all."""
    out = {**verdict, "files": engine_files(folder)}
    return {**out, "seal": _seal(out)}


def cached_verdict(verdict_file: Path, folder: Path, what: str) -> dict | None:
    """A cached verdict that still describes the engine files beside it, checked on every
    use; None (with the engine removed, to be converted and verified again, and a warning
    saying so) when it is unreadable, altered or the files changed since."""
    if not verdict_file.is_file():
        return None
    try:
        verdict = json.loads(verdict_file.read_text())
        ok = isinstance(verdict, dict) and verdict.get("seal") == _seal(verdict)
    except (OSError, ValueError):
        verdict, ok = None, False
    if not ok:
        why = "its verdict is unreadable or was altered"
    else:
        now = engine_files(folder)
        changed = sorted(set(now) ^ set(verdict["files"]) |
                         {k for k in now if verdict["files"].get(k) != now[k]})
        if not changed:
            return verdict
        why = f"{', '.join(changed)} changed since it was verified"
    log.warning("cache %s: the %s engine is not the one verified (%s); converting and verifying "
                "it again", folder, what, why)
    shutil.rmtree(folder, ignore_errors=True)
    verdict_file.unlink(missing_ok=True)
    return None

