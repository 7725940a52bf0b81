"""The project's own exception types; cli.py prints them as one line."""


class ThumbclfError(Exception):
    """Base class: an error the user can fix, printed without a traceback."""


class ConfigError(ThumbclfError):
    """The experiment file or a command-line override is wrong."""


class DataError(ThumbclfError):
    """Input tables, folders or images are unusable."""


class ModelError(ThumbclfError):
    """A model file or pretrained weights cannot be used."""


class OutputError(ThumbclfError):
    """The results folder cannot be written or would be overwritten."""
