"""thumbclf: classify whole-slide-image thumbnails into slide types.

The Python API (docs: how-to/python-api and reference/api):

    import thumbclf
    folder = thumbclf.train("experiments/crc.yaml")     # or a dict of the same keys
    model = thumbclf.load_model(folder)
    table = model.predict(["a.png", "b.jpg"])           # a DataFrame like predictions.csv
"""

from thumbclf.api import Classifier, deploy, load_model, merge, pretrain, train
from thumbclf.core.errors import ConfigError, DataError, ModelError, OutputError, ThumbclfError
from thumbclf.core.version import __version__

__all__ = ["train", "deploy", "pretrain", "merge", "load_model", "Classifier", "ThumbclfError",
           "ConfigError", "DataError", "ModelError", "OutputError", "__version__"]
