"""thumbclf: classify whole-slide-image thumbnails into slide types."""

__version__ = "1.0.0"
