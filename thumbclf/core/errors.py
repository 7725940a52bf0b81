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


class ImageReadError(DataError):
    """One image or slide could not be read; the run goes on without it."""


def finite_or_diverged(value: float, what: str) -> None:
    """ConfigError when a training's ``value`` (a loss) is NaN or infinite: it diverged, and
    nothing trained after it may be saved."""
    if not math.isfinite(value):
        raise ConfigError(f"training diverged: {what} became {value}; no model file was written. "
                          "Lower lr, or check the images; then run again (a --resume continues "
                          "from the last good epoch's checkpoint)")
