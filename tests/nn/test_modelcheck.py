"""nn/modelcheck.py: every field of a model file and an SSL checkpoint is checked before it is
used (issue 24: untrusted model files)."""

import math

import numpy as np
import pytest
import torch

from thumbclf.core.errors import ModelError
from thumbclf.inputs.images import Preprocessing
from thumbclf.nn import models
from thumbclf.nn.data import IMAGENET
from thumbclf.nn.familiarity import Familiarity

CLASSES = ("Biopsy", "IHC", "TMA")


@pytest.fixture(scope="module")
def model_payload(tmp_path_factory) -> dict:
    """A valid model file's contents (untrained resnet18 with an unfamiliar-slide rule)."""
    torch.manual_seed(0)
    net = models.build_model("resnet18", 3)
    bank = np.random.default_rng(0).normal(size=(32, 512)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    path = tmp_path_factory.mktemp("payload") / "model.pt"
    models.save_model(path, models.LoadedModel(
        net, "resnet18", CLASSES, Preprocessing(size=64), IMAGENET, threshold=0.5,
        familiarity=Familiarity(bank, 0.1),
        calibration={"temperature": 1.0, "status": "fitted", "images": 30}))
    return torch.load(path, weights_only=True)


def _altered(payload: dict, tmp_path, **changes):
    obj = dict(payload)
    obj["familiarity"] = dict(payload["familiarity"])
    for key, value in changes.items():
        if key.startswith("familiarity_"):
            obj["familiarity"][key.removeprefix("familiarity_")] = value
        elif value is KeyError:
            obj.pop(key)
        else:
            obj[key] = value
    path = tmp_path / "altered.pt"
    torch.save(obj, path)
    return path


def test_a_valid_model_file_loads(model_payload, tmp_path):
    """Issue 24, hostile inputs."""
    loaded = models.load_model(_altered(model_payload, tmp_path))
    assert loaded.classes == CLASSES and loaded.familiarity is not None


def _nan_weights(payload):
    state = dict(payload["state_dict"])
    state["fc.weight"] = torch.full_like(state["fc.weight"], math.nan)
    return state


BAD_FIELDS = [
    ("input_size", 100000, "input_size must be a whole number of pixels from 16 to 2048"),
    ("input_size", 0, "input_size must be"),
    ("input_size", "224", "input_size must be"),
    ("format_version", 99, "format_version 99: made by a newer thumbclf"),
    ("temperature", math.nan, "temperature must be a finite number above 0"),
    ("temperature", 0.0, "temperature must be a finite number above 0"),
    ("temperature", -1.0, "temperature must be a finite number above 0"),
    ("threshold", 2.0, "threshold must be a number between 0 and 1"),
    ("threshold", math.nan, "threshold must be a number between 0 and 1"),
    ("classes", ["A", "A", "B"], "classes must be distinct; A appear twice"),
    ("classes", ["A"], "classes must list at least 2 class names"),
    ("mean", "abc", "mean must be 3 finite numbers"),
    ("std", [0.2, 0.0, 0.2], "std must be 3 finite numbers above 0"),
    ("familiarity_k", 0, "familiarity.k must be a whole number from 1 to the bank's rows"),
    ("familiarity_k", 10**6, "familiarity.k must be"),
    ("familiarity_threshold", math.nan, "familiarity.threshold must be a finite number above 0"),
    ("familiarity_threshold", 0.0, "familiarity.threshold must be"),
    ("familiarity_bank", torch.zeros(1, 512).expand(100_000_000, 512),
     "familiarity.bank has shape"),
    ("familiarity_bank", torch.zeros(1, 512, dtype=torch.float16).expand(1000, 512),
     "repeated \\(stride-0\\) rows"),
    ("familiarity_bank", torch.ones(32, 100, dtype=torch.float16),
     "familiarity.bank has 100 features per row, but the model's head takes 512"),
    ("state_dict", KeyError, "state_dict: missing"),
]


@pytest.mark.parametrize("field,value,message", BAD_FIELDS,
                         ids=[f"{f}={str(v)[:20]}" for f, v, _ in BAD_FIELDS])
def test_every_field_of_a_model_file_is_checked(model_payload, tmp_path, field, value, message):
    """Issue 24, hostile inputs."""
    path = _altered(model_payload, tmp_path, **{field: value})
    with pytest.raises(ModelError, match=message):
        models.load_model(path)


def test_nan_weights_are_refused(model_payload, tmp_path):
    """Issue 24, hostile inputs."""
    path = _altered(model_payload, tmp_path, state_dict=_nan_weights(model_payload))
    with pytest.raises(ModelError, match="tensors hold NaN or infinite weights \\(first: fc.weight\\)"):
        models.load_model(path)
    torch.save(_nan_weights(model_payload), tmp_path / "legacy.pt")  # a plain state dict
    with pytest.raises(ModelError, match="NaN or infinite weights"):
        models.load_model(tmp_path / "legacy.pt", target_labels=CLASSES)


def _ssl_file(tmp_path, **changes):
    backbone, _ = models.backbone_only("resnet18")
    path = tmp_path / "ssl_checkpoint.pt"
    models.save_ssl_checkpoint(path, backbone, arch="resnet18", prep=Preprocessing(size=224),
                               norm=IMAGENET, description={"method": "byol"})
    obj = torch.load(path, weights_only=True)
    for k, v in changes.items():
        if v is KeyError:
            obj.pop(k)
        else:
            obj[k] = v
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("field,value,message", [
    ("state_dict", KeyError, "state_dict: missing"),
    ("format_version", 99, "format_version 99"),
    ("input_size", 100000, "input_size must be"),
    ("mean", "abc", "mean must be"),
])
def test_every_field_of_an_ssl_checkpoint_is_checked(tmp_path, field, value, message):
    """Issue 24, hostile inputs."""
    path = _ssl_file(tmp_path, **{field: value})
    with pytest.raises(ModelError, match=message):
        models.read_ssl(path, "resnet18")


def test_an_ssl_checkpoint_of_nan_weights_is_refused(tmp_path):
    """Issue 24, hostile inputs."""
    path = _ssl_file(tmp_path)
    obj = torch.load(path, weights_only=True)
    obj["state_dict"]["conv1.weight"] = obj["state_dict"]["conv1.weight"] * math.nan
    torch.save(obj, path)
    with pytest.raises(ModelError, match="NaN or infinite weights \\(first: conv1.weight\\)"):
        models.read_ssl(path, "resnet18")
