"""outputs/explain.py: Grad-CAM heat maps, their overlay, and which images the gallery shows."""

import numpy as np
import pandas as pd
import torch

from thumbclf.core import table
from thumbclf.core.decide import UNDECIDED
from thumbclf.outputs.explain import as_map, gradcam, overlay, select


def test_a_heat_map_covers_the_input_in_0_to_1_and_leaves_the_model_as_it_was():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).train()
    cam = gradcam(model, "resnet18", torch.randn(1, 3, 64, 64), 1)
    assert cam.shape == (64, 64) and cam.min() >= 0 and cam.max() <= 1 and cam.max() > 0
    assert model.training  # put back in the mode it came in


def test_maps_are_found_in_feature_maps_and_vit_tokens_only():
    assert as_map(torch.zeros(2, 8, 4, 4)).shape == (2, 8, 4, 4)
    assert as_map(torch.zeros(2, 1 + 16, 8)).shape == (2, 8, 4, 4)  # class token left out
    assert as_map(torch.zeros(2, 8, 1, 1)) is None and as_map(torch.zeros(2, 10)) is None


def test_the_overlay_is_an_rgb_image_in_0_to_1():
    image = np.full((8, 8, 3), 255, np.uint8)
    out = overlay(image, np.linspace(0, 1, 64).reshape(8, 8))
    assert out.shape == (8, 8, 3) and out.min() >= 0 and out.max() <= 1
    assert not np.allclose(out[0, 0], out[-1, -1])  # cold and hot ends differ


def test_the_gallery_shows_the_most_confident_of_each_class_and_the_least_confident_undecided():
    df = pd.DataFrame({"A": [0.9, 0.8, 0.2, 0.55, 0.5, 0.7], "B": [0.1, 0.2, 0.8, 0.45, 0.5, 0.3],
                       table.DECISION: ["A", "A", "B", UNDECIDED, UNDECIDED, "A"],
                       table.ERROR: ["", "", "", "", "", "unreadable"]})
    chosen = select(df, ["A", "B"], per_class=1)
    assert chosen.index.tolist() == [0, 2, 4]
