"""core/errors.py: the project's errors, one printable line per problem."""

import math
import pickle

import pytest

from thumbclf.core.errors import ConfigError, DataError, ImageReadError, clean, finite_or_diverged


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


def test_a_loss_that_is_not_finite_means_the_training_diverged():
    finite_or_diverged(0.7, "the training loss")
    with pytest.raises(ConfigError, match="training diverged: the training loss became nan"):
        finite_or_diverged(math.nan, "the training loss")
    with pytest.raises(ConfigError, match="became inf"):
        finite_or_diverged(math.inf, "the training loss")
