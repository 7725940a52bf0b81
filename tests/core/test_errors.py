"""core/errors.py: the project's errors, one printable line per problem."""

import math
import pickle

import pytest

from thumbclf.core.errors import (ConfigError, DataError, ImageReadError, ReadFailure, clean,
                                  error_kind, finite_or_diverged)


def test_a_line_shows_control_characters_and_bytes_that_are_not_text_escaped():
    odd = b"caf\xe9".decode("utf-8", "surrogateescape")
    assert clean(f"a\nb\x1b[31m {odd}") == "a\\nb\\x1b[31m caf\\xe9"
    assert clean("plain text, ümlaut") == "plain text, ümlaut"


def test_an_error_keeps_its_problems_through_pickling():
    err = ConfigError("e.yaml: lr must be a number", "e.yaml: foldNumbr: unknown key")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ConfigError and back.problems == err.problems
    assert back.lines() == ["e.yaml: lr must be a number", "e.yaml: foldNumbr: unknown key"]
    assert issubclass(ImageReadError, DataError)


def test_a_read_error_keeps_its_kind_through_pickling_and_into_its_row():
    """Issue 32, item 2: the kind travels with the message from a decoding worker to the row."""
    from thumbclf.inputs.tiles import SlideTooLarge

    err = pickle.loads(pickle.dumps(ImageReadError("a.svs: gone", kind="not found")))
    assert type(err) is ImageReadError and err.kind == "not found" and str(err) == "a.svs: gone"
    assert pickle.loads(pickle.dumps(SlideTooLarge("b.svs: slow"))).kind == "too large"
    row = pickle.loads(pickle.dumps(ReadFailure.of(err)))
    assert row == "a.svs: gone" and error_kind(row) == "not found"
    assert error_kind(ReadFailure.of(ValueError("x"))) == "unreadable"
    assert error_kind("plain message") == "unreadable" and error_kind("") == ""
    assert ReadFailure("x", "made up").kind == "unreadable"  # only the known kinds


def test_a_loss_that_is_not_finite_means_the_training_diverged():
    finite_or_diverged(0.7, "the training loss")
    with pytest.raises(ConfigError, match="training diverged: the training loss became nan"):
        finite_or_diverged(math.nan, "the training loss")
    with pytest.raises(ConfigError, match="became inf"):
        finite_or_diverged(math.inf, "the training loss")
