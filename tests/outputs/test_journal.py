"""outputs/journal.py: the review journal's appends."""

from __future__ import annotations

import errno
import os

import pytest

from thumbclf.core import files
from thumbclf.core.errors import OutputError
from thumbclf.outputs import journal


def test_a_full_disk_while_reviewing_does_not_suggest_resume(tmp_path, monkeypatch):
    """Issue 33, item 20: review on a full disk suggested --resume, which it lacks."""
    target = tmp_path / "journal.jsonl"
    entry = {"path": "/a.png", "classification": "IHC", "reviewer": "", "at": "", "seq": 1}
    journal.append(target, entry)

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "write", full)
    with pytest.raises(OutputError, match="is the disk full") as caught:
        journal.append(target, {**entry, "seq": 2})
    assert "--resume" not in str(caught.value) and "reload the page" in str(caught.value)
    monkeypatch.undo()
    assert [e["seq"] for e in journal.read(target)] == [1]  # nothing half-written
