"""Backbone names: torchvision's classification models and the prototype's names for them.
Imports torchvision only when a name is checked."""

from __future__ import annotations

import difflib
import functools

from thumbclf.core.errors import ModelError

# The prototype's model_name values and the torchvision architectures it built for them.
PROTOTYPE_NAMES = {"resnet": "resnet50", "resnet18": "resnet18", "alexnet": "alexnet",
                   "vgg": "vgg11_bn", "vgg16": "vgg16_bn", "squeezenet": "squeezenet1_0",
                   "densenet": "densenet121", "inception": "inception_v3", "vit": "vit_b_32",
                   "efficient": "efficientnet_b7"}


@functools.cache
def zoo() -> tuple[str, ...]:
    """torchvision's classification models, by name."""
    import torchvision.models as tvm  # here: checking a name must not import torch first

    return tuple(tvm.list_models(module=tvm))


def arch_name(name: str) -> str:
    """Canonical backbone name (a prototype name maps to its architecture); unknown: ModelError."""
    key = str(name).strip().lower()
    key = PROTOTYPE_NAMES.get(key, key)
    if key not in zoo():
        raise ModelError(f"model_name {name!r} is unknown; {name_rule(name)}")
    return key


def name_rule(name: str) -> str:
    """What model_name accepts, with the names closest to ``name``."""
    close = difflib.get_close_matches(str(name).lower(), [*PROTOTYPE_NAMES, *zoo()], n=3,
                                      cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return (f"{hint}use a torchvision classification model (resnet18, convnext_tiny, vit_b_16, "
            "...: torchvision.models.list_models(module=torchvision.models)) or a prototype "
            f"name ({', '.join(PROTOTYPE_NAMES)})")
