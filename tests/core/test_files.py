"""core/files.py: the one write path into a results folder never follows a link (issue 33)."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from thumbclf.core.errors import OutputError
from thumbclf.core.files import (FILE_MODE, OutputLock, append_whole, atomic_text, copy_verified,
                                 repair_tail)


def test_no_write_into_a_locked_folder_follows_a_link(tmp_path):
    """Issue 33, item 10: every write helper refuses a link on its way inside the locked
    folder (the file itself, or a folder above it); the locked folder may itself be a link."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f.txt").write_text("mine")
    real = tmp_path / "real"
    real.mkdir()
    folder = tmp_path / "chosen"
    folder.symlink_to(real, target_is_directory=True)  # the user's choice: allowed
    (folder / "linked").symlink_to(outside, target_is_directory=True)
    (folder / "file.txt").symlink_to(outside / "f.txt")
    src = tmp_path / "src.bin"
    src.write_bytes(b"data")
    with OutputLock(folder).acquire():
        atomic_text("fine", folder / "sub" / "ok.txt")
        for write in (lambda: atomic_text("x", folder / "linked" / "new.txt"),
                      lambda: copy_verified(src, folder / "linked" / "deep" / "copy.bin"),
                      lambda: append_whole(folder / "file.txt", b"line\n"),
                      lambda: append_whole(folder / "linked" / "j.jsonl", b"line\n")):
            with pytest.raises(OutputError, match="symbolic link"):
                write()
    assert sorted(p.name for p in outside.iterdir()) == ["f.txt"]
    assert (outside / "f.txt").read_text() == "mine"
    assert (real / "sub" / "ok.txt").read_text() == "fine"


def test_append_refuses_a_link_and_a_fifo_even_outside_a_locked_folder(tmp_path):
    import os

    target = tmp_path / "t.txt"
    target.write_text("keep")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OutputError, match="link"):
        append_whole(tmp_path / "link", b"x\n")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OutputError, match="not a plain file"):
        append_whole(tmp_path / "fifo", b"x\n")
    assert target.read_text() == "keep"


def test_a_torn_tail_longer_than_a_mebibyte_is_cut_back_to_the_last_newline(tmp_path):
    """Issue 33, item 4: a torn tail over 1 MiB cut the whole file to 0 bytes."""
    f = tmp_path / "partial.csv"
    f.write_bytes(b"position,A\n0,1\n" + b"9" * (3 << 20))
    assert repair_tail(f) == 3 << 20
    assert f.read_bytes() == b"position,A\n0,1\n"


def test_an_append_is_whole_or_not_at_all(tmp_path, monkeypatch):
    """Issue 10, item 3: nothing lost."""
    from thumbclf.core.errors import OutputError

    f = tmp_path / "p.csv"
    append_whole(f, b"position,A\n0,1\n")
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OutputError, match="No space left on device.*--resume"):
        append_whole(f, b"1,0.5\n2,0.25\n")
    monkeypatch.undo()
    assert f.read_bytes() == b"position,A\n0,1\n"
    with open(f, "ab") as h:  # a crash mid-write (no chance to cut back): a torn last line
        h.write(b"1,0.")
    assert repair_tail(f) == 4 and f.read_bytes() == b"position,A\n0,1\n"


def test_result_files_are_readable_as_the_umask_says(tmp_path):
    """Issue 10, item 10: nothing lost."""
    atomic_text("x", tmp_path / "f.txt")
    mode = stat.S_IMODE((tmp_path / "f.txt").stat().st_mode)
    assert mode == FILE_MODE
    old = os.umask(0o022)
    os.umask(old)
    assert mode == 0o666 & ~old and mode & 0o044 == 0o044 & ~old


def test_a_full_disk_is_a_clear_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    """Issue 5, messy archives."""
    target = tmp_path / "out.csv"
    target.write_text("old complete content")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match="No space left on device.*disk full"):
        atomic_text("new", target)
    assert target.read_text() == "old complete content"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]
