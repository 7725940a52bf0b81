"""thumbclf: classify whole-slide-image thumbnails into slide types.

The Python API (see the README's "Install as a package"):

    import thumbclf
    folder = thumbclf.train("experiments/crc.yaml")     # or a dict of the same keys
    model = thumbclf.load_model(folder)
    table = model.predict(["a.png", "b.jpg"])           # a DataFrame like predictions.csv

``thumbclf.train`` and ``thumbclf.deploy`` are these functions, never the submodules of the same
names: import those by their full name (``from thumbclf.train import run``).
"""

import sys as _sys
import types as _types

from .api import Classifier, deploy, load_model, train
from .errors import ConfigError, DataError, ModelError, OutputError, ThumbclfError

__version__ = "1.0.0"
__all__ = ["train", "deploy", "load_model", "Classifier", "ThumbclfError", "ConfigError",
           "DataError", "ModelError", "OutputError", "__version__"]
_API_NAMES = frozenset({"train", "deploy"})


class _Package(_types.ModuleType):
    """Importing the submodules thumbclf.train / thumbclf.deploy must not replace the API
    functions of the same names (the import system sets a package attribute per submodule)."""

    def __setattr__(self, name, value):
        if name in _API_NAMES and isinstance(value, _types.ModuleType):
            return  # the submodule stays in sys.modules under its full name
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
