"""The version of thumbclf (read by setuptools and by every report)."""

__version__ = "1.1.0"
