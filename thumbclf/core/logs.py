"""Logging of a run: INFO to the console, DEBUG to run.log in the results folder; console lines
never carry control characters from data."""

from __future__ import annotations

import logging
from pathlib import Path

from thumbclf.core import layout
from thumbclf.core.errors import clean


class _PlainFormatter(logging.Formatter):
    """Console lines never carry control characters from data (file names, labels)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = clean(record.message)
        return super().formatMessage(record)


def setup_logging(folder: Path | None, *, quiet: bool = False, debug: bool = False,
                  tag: str = "") -> None:
    """INFO (WARNING if quiet) to the console; DEBUG to <folder>/run.log (appended). ``tag``
    marks the run.log lines of a worker process (e.g. a fold's Ray task)."""
    root = logging.getLogger()
    remove_handlers()
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler()
    console.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    console.setFormatter(_PlainFormatter("%(message)s"))
    console._thumbclf = True  # type: ignore[attr-defined]
    if not debug:  # libraries' messages (tifffile, pydicom, OpenSlide's readers) go to run.log
        console.addFilter(lambda record: _ours(record.name, quiet))
    logging.captureWarnings(True)
    root.addHandler(console)
    if folder is not None:
        fh = logging.FileHandler(folder / layout.RUN_LOG, encoding="utf-8", errors="backslashreplace")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{f' [{tag}]' if tag else ''}: %(message)s"))
        fh._thumbclf = True  # type: ignore[attr-defined]
        root.addHandler(fh)
    for noisy in ("PIL", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)



# the slide and image readers' loggers (and the root logger, which wsidicomizer uses): their
# lines are about a file's insides (tifffile's "TiffPage 1: ... not found"), and a slide's
# problem reaches the console as its row's one-line error (issues 31 and 33)
READER_LOGGERS = ("tifffile", "pydicom", "wsidicom", "wsidicomizer", "openslide", "imagecodecs",
                  "PIL", "root")


def _ours(name: str, quiet: bool) -> bool:
    """Whether a record reaches the console: not the readers' (run.log only), nor Python
    warnings when quiet."""
    if name.split(".")[0] in READER_LOGGERS:
        return False
    return not (quiet and name == "py.warnings")


def remove_handlers() -> None:
    """Remove (and close) the handlers ``setup_logging`` added."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_thumbclf", False):
            root.removeHandler(h)
            h.close()
    logging.captureWarnings(False)
