"""The results folder: refuse to overwrite, atomic writes, run.log."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from thumbclf.core import layout
from thumbclf.core.errors import NOT_FOUND, ImageReadError, OutputError, clean

if TYPE_CHECKING:  # the readers import this module: "import thumbclf" stays without pandas
    import pandas as pd

log = logging.getLogger(__name__)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_current_umask()  # result files as any tool makes them (group-readable)
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_HELD: set[str] = set()  # the folders whose lock this process holds: no write follows a link there


def refuse_links(path: Path) -> None:
    """OutputError when ``path`` or a folder between it and a locked folder holding it (the
    results folder, the cache) is a symbolic link: thumbclf never writes through a link there
    (issue 33). The locked folder itself may be a link: the user chose it."""
    target = os.path.abspath(path)
    for root in _HELD:
        if target == root or not target.startswith(root.rstrip(os.sep) + os.sep):
            continue
        part = root
        for name in target[len(root):].strip(os.sep).split(os.sep):
            part = os.path.join(part, name)
            if os.path.islink(part):
                raise OutputError(f"{part}: is a symbolic link inside {root}; thumbclf never "
                                  "writes through links there: remove it, then run again")


class OutputLock:
    """Ownership of a results folder: one run at a time. The operating system releases it when
    the process ends, however it ends; a lock file left by a crash is reclaimed."""

    def __init__(self, folder: Path, *, name: str = layout.LOCK, wait: bool = False,
                 what: str = "results folder", fix: str = "choose another --output"):
        self.path = folder / name
        self.wait, self.what, self.fix = wait, what, fix
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        for _ in range(20):  # retry if another run removed the file between open and lock
            try:  # never through a link: the lock file is ours and holds nothing else
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | NOFOLLOW, FILE_MODE)
            except OSError as exc:
                raise OutputError(f"{self.path}: cannot create the lock file of the {self.what} "
                                  f"({exc.strerror or exc}); remove it if it is a link, "
                                  f"or {self.fix}") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OutputError(f"{self.path}: is not a plain file; remove it")
            if not _try_lock(fd, self.wait):
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                raise OutputError(f"{self.path.parent}: another thumbclf run is using this "
                                  f"{self.what} ({holder}); wait for it to finish, or "
                                  f"{self.fix}")
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            stale = clean(os.read(fd, 120).decode("utf-8", "replace").strip())
            if stale:
                log.warning("%s: reclaimed the lock of an earlier run (%s) that ended without "
                            "releasing it", self.path.parent, stale)
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
            self._fd = fd
            _HELD.add(os.path.abspath(self.path.parent))
            return self
        raise OutputError(f"{self.path.parent}: cannot lock the {self.what}; try again")

    def release(self) -> None:
        """Give the folder up (remove the lock file, then unlock)."""
        if self._fd is None:
            return
        _HELD.discard(os.path.abspath(self.path.parent))
        if os.name == "nt":  # Windows cannot delete an open file: close (unlock), then delete
            os.close(self._fd)
            self._fd = None
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass  # another run took it meanwhile
            return
        self.path.unlink(missing_ok=True)  # first: no other run can lock this file after it
        os.close(self._fd)  # closing releases the lock
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(fd: int, wait: bool = False) -> bool:
    """Lock ``fd`` exclusively: at once or not at all, or (``wait``) when its holder is done."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except OSError:
        return False


def _atomic(path: Path, write) -> None:
    refuse_links(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600 files; results are shared as usual
            os.fchmod(fd, FILE_MODE)
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


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_text(text: str, path: Path) -> None:
    atomic_bytes(text.encode("utf-8", "surrogateescape"), path)  # file names as they are


def atomic_csv(df: pd.DataFrame, path: Path) -> None:
    """Write a table (cells a spreadsheet would run as formulas neutralised: table.to_csv)."""
    from thumbclf.core.table import to_csv

    atomic_text(to_csv(df), path)


def atomic_yaml(data: Any, path: Path) -> None:
    atomic_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch  # here, not above: decoding workers import this module without torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_bytes(buf.getvalue(), path)


def copy_verified(src: Path, dst: Path) -> None:
    """Copy (never move) ``src`` to a new file ``dst``, atomically, checking the copy's size;
    an existing ``dst`` is never replaced (OutputError instead)."""
    refuse_links(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        shutil.copy2(src, tmp)
        if tmp.stat().st_size != src.stat().st_size:
            raise OutputError(f"{dst}: copy is incomplete (size differs from {src})")
        try:
            os.link(tmp, dst)  # fails if dst exists: no copy ever replaces another file
        except FileExistsError:
            raise OutputError(f"{dst}: exists already; refusing to overwrite it with a copy "
                              f"of {src}") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK,
                                 errno.ENOSYS):
                raise
            if dst.exists():  # no hard links on this file system: check, then rename
                raise OutputError(f"{dst}: exists already; refusing to overwrite it with a "
                                  f"copy of {src}") from None
            os.replace(tmp, dst)
    except OSError as exc:
        raise OutputError(f"{dst}: cannot copy {src} ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)


def append_whole(path: Path, data: bytes, *, own_line: bool = False,
                 then: str = "continue with the same command plus --resume") -> None:
    """Append ``data`` (whole lines) to ``path`` so that a crash or a full disk never leaves
    part of it: one write, synced; on failure the file is cut back to its previous end. Never
    through a link, nor into anything but a plain file. ``own_line``: start a new line where
    the file's last one has no newline (instead of cutting that line off). ``then``: what to
    do once space is freed, in the message of a failed write."""
    refuse_links(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | NOFOLLOW
                     | getattr(os, "O_NONBLOCK", 0), FILE_MODE)  # a FIFO: refused, not waited on
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc}); remove it if it is a "
                          "link") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OutputError(f"{path}: is not a plain file; remove it")
        end = os.fstat(fd).st_size
        if own_line and end and os.pread(fd, 1, end - 1) != b"\n":
            data = b"\n" + data
        try:
            written = os.write(fd, data)
            while written < len(data):  # a short write: finish it or fail below
                n = os.write(fd, data[written:])
                if n == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written += n
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass  # repair_tail drops a torn line on --resume
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc}); is the disk full? "
                              f"Free space, then {then}") from None
    finally:
        os.close(fd)


def repair_tail(path: Path) -> int:
    """Cut a torn last line (no newline: the write was interrupted) off ``path``, however long
    it is; return the number of bytes dropped."""
    if not path.is_file():
        return 0
    refuse_links(path)
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        keep, end = 0, size
        while end > 0:  # back, a chunk at a time, to the last newline (issue 33: not 1 MiB)
            start = max(0, end - (1 << 20))
            f.seek(start)
            cut = f.read(end - start).rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        f.truncate(keep)
        return size - keep


def check_writable(folder: Path, what: str) -> None:
    """OutputError unless ``folder`` is, or can be made, a writable folder."""
    why = layout.writable_or_creatable(folder)
    if why is not None:
        raise OutputError(f"{folder}: cannot write the {what} ({why}); choose a writable folder")


def regular_file(path: Path) -> None:
    """ImageReadError unless ``path`` is a regular file. The one check before every open of
    every reader (pictures, slides, a MIRAX's index and data files, TIFF levels, DICOM
    instances): a FIFO would block the run forever, a device (/dev/zero) never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found", kind=NOT_FOUND) from None
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot open ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device" if
                stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a folder" if stat.S_ISDIR(mode)
                else "not a file")
        raise ImageReadError(f"{path}: {kind}, not a regular file; thumbclf reads only files")
