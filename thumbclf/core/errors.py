"""The project's own exception types; cli.py prints them as one line each."""

from __future__ import annotations

import math
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _shown(m: re.Match) -> str:
    c = ord(m.group())
    # a byte of a name that is not UTF-8 (a surrogate escape) as \xNN, as the tables write it
    return f"\\x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else repr(m.group())[1:-1]


def clean(text: str) -> str:
    """One printable line: control characters (line breaks, terminal escapes) shown escaped,
    the bytes of a name that is not UTF-8 as \\xNN."""
    return _CONTROL.sub(_shown, str(text))


class ThumbclfError(Exception):
    """Base class: an error the user can fix, printed without a traceback.

    Several problems (e.g. of one experiment file) may be given; each becomes one line.
    """

    def __init__(self, *problems: str):
        self.problems = tuple(str(p) for p in problems)
        super().__init__("\n".join(self.problems))

    def __reduce__(self):  # pickled whole (sent between processes: Ray tasks, torchrun ranks)
        return type(self), self.problems

    def lines(self) -> list[str]:
        """The problems, one printable line each."""
        return [clean(p) for p in self.problems] or [clean(str(self))]


class ConfigError(ThumbclfError):
    """The experiment file or a command-line override is wrong."""


class DataError(ThumbclfError):
    """Input tables, folders or images are unusable."""


class ModelError(ThumbclfError):
    """A model file or pretrained weights cannot be used."""


class OutputError(ThumbclfError):
    """The results folder cannot be written or would be overwritten."""


# What became of an input that could not be read: predictions.csv's error_kind, the report's
# counts (outputs/tally.py). Counted by kind, never by the words of the message, so that
# rewording a message, or a file named "file not found.png", cannot move a row.
NOT_FOUND, TOO_LARGE, INCOMPLETE = "not found", "too large", "incomplete"
SEVERAL_SERIES, UNREADABLE = "several series in one folder", "unreadable"
ERROR_KINDS = (NOT_FOUND, TOO_LARGE, INCOMPLETE, SEVERAL_SERIES, UNREADABLE)


class ImageReadError(DataError):
    """One image or slide could not be read; the run goes on without it. ``kind``: one of
    ERROR_KINDS (a class's own, or given where raised)."""

    kind = UNREADABLE

    def __init__(self, *problems: str, kind: str | None = None):
        super().__init__(*problems)
        if kind is not None:
            self.kind = kind

    def __reduce__(self):
        return _image_read_error, (type(self), self.problems, self.kind)


def _image_read_error(cls: type, problems: tuple[str, ...], kind: str) -> ImageReadError:
    return cls(*problems, kind=kind)


class ReadFailure(str):
    """An input's error message as its row carries it, with its ``kind`` (ERROR_KINDS): a
    string everywhere a message goes, and the kind where rows are counted."""

    kind: str

    def __new__(cls, text: str, kind: str = UNREADABLE):
        obj = super().__new__(cls, text)
        obj.kind = kind if kind in ERROR_KINDS else UNREADABLE
        return obj

    def __reduce__(self):  # sent whole between processes (decoding workers)
        return ReadFailure, (str(self), self.kind)

    @classmethod
    def of(cls, exc: BaseException) -> "ReadFailure":
        """The failure an exception reading an input stands for (not an ImageReadError: an
        unexpected one, 'unreadable')."""
        return cls(str(exc), getattr(exc, "kind", UNREADABLE))


def read_failures(errors, kinds) -> list:
    """Rows' errors joined with their kinds, as tables and Ray's batches carry them (two
    columns): a ReadFailure each, '' for a readable input."""
    return [ReadFailure(str(e), str(k)) if e else "" for e, k in zip(errors, kinds)]


def error_kind(error: str) -> str:
    """The kind of a row's error ('' for none); a plain message is 'unreadable'."""
    return getattr(error, "kind", UNREADABLE) if error else ""


def finite_or_diverged(value: float, what: str) -> None:
    """ConfigError when a training's ``value`` (a loss) is NaN or infinite: it diverged, and
    nothing trained after it may be saved."""
    if not math.isfinite(value):
        raise ConfigError(f"training diverged: {what} became {value}; no model file was written. "
                          "Lower lr, or check the images; then run again (a --resume continues "
                          "from the last good epoch's checkpoint)")
