"""The self-supervised method: views, BYOL loss and target, schedules."""

import math

import numpy as np
import torch

from thumbclf.inputs import synth
from thumbclf.nn.data import IMAGENET, to_input

from thumbclf.nn.models import backbone_only
from thumbclf.nn.ssl import BYOL, lr_at, momentum_at
from thumbclf.nn.augment import ssl_view

NORM = IMAGENET


def thumbnails(n: int, size: int = 64) -> torch.Tensor:
    """n synthetic slide thumbnails as uint8 (n, size, size, 3)."""
    rng = np.random.default_rng(0)
    kinds = synth.CLASSES
    imgs = [np.asarray(synth.draw_slide(kinds[i % len(kinds)], size, size, rng)) for i in range(n)]
    return torch.from_numpy(np.stack(imgs))


def test_views_keep_shape_and_tissue_and_differ_between_draws():
    x = thumbnails(6)
    g = torch.Generator().manual_seed(0)
    a, b = ssl_view(x, g), ssl_view(x, g)
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert not torch.equal(a, b)
    assert torch.equal(ssl_view(x, torch.Generator().manual_seed(0)), a)  # seeded
    # a purple disc centred on glass: every view keeps (nearly) all of it
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disc = ((yy - 31.5) ** 2 + (xx - 31.5) ** 2) < (0.35 * 64) ** 2
    img = torch.full((64, 64, 3), 250, dtype=torch.uint8)
    img[disc] = torch.tensor([120, 60, 140], dtype=torch.uint8)
    views = ssl_view(img.expand(64, -1, -1, -1).contiguous(), g)
    kept = (views.float().mean(-1) < 200).float().sum((1, 2)) / disc.sum()
    assert kept.min() > 0.65, kept.min()  # at most shrunk (0.85² of its area), never cut off


def test_byol_loss_is_finite_and_falls_over_a_few_steps_on_a_fixed_batch():
    torch.manual_seed(0)
    backbone, features = backbone_only("resnet18")
    learner = BYOL(backbone, features, projection_dim=32)
    opt = torch.optim.Adam(learner.online_parameters(), lr=1e-3)
    x = thumbnails(8)
    g = torch.Generator().manual_seed(1)
    v1 = to_input(ssl_view(x, g), NORM, torch.device("cpu"))
    v2 = to_input(ssl_view(x, g), NORM, torch.device("cpu"))
    target_before = learner.target_backbone.conv1.weight.clone()
    losses = []
    for _ in range(6):
        loss = learner(v1, v2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        learner.update_target(0.99)
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) and 0 <= v <= 4 for v in losses), losses
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.grad is None for p in learner.target_parameters())  # the target gets no gradient
    moved = learner.target_backbone.conv1.weight - target_before
    assert 0 < moved.abs().max() < (learner.backbone.conv1.weight - target_before).abs().max()


def test_schedules_warm_up_decay_and_raise_the_momentum_to_one():
    total = 100
    assert lr_at(0, total, 1.0) == 0.1 and lr_at(9, total, 1.0) == 1.0
    assert lr_at(99, total, 1.0) < 0.01
    assert momentum_at(0, total, 0.99) == 0.99 and momentum_at(total, total, 0.99) == 1.0
    assert 0.99 < momentum_at(50, total, 0.99) < 1.0
