"""Tensors from images: augmentation, training batches, balanced sampling, normalisation."""

import numpy as np
import pytest
import torch

from thumbclf.inputs.cache import DecodedImages
from thumbclf.nn.data import IMAGENET, to_input, training_batches
from thumbclf.nn.augment import augment, dihedral


def decoded(n=10, size=16):
    arr = np.stack([np.full((size, size, 3), i, np.uint8) for i in range(n)])
    return DecodedImages(arr, np.arange(n))


def test_augmentation_keeps_shape_dtype_and_range():
    gen = torch.Generator().manual_seed(0)
    x = torch.full((6, 32, 32, 3), 255, dtype=torch.uint8)  # empty glass
    x[:, 8:24, 8:24] = torch.tensor([200, 100, 150], dtype=torch.uint8)  # tissue
    out = augment(x, gen)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert int(out.min()) >= 0 and int(out.max()) <= 255
    assert (out[:, 0, 0] >= 200).all()  # glass stays light: colour jitter is mild
    assert not torch.equal(out, x)
    again = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # the generator decides everything


def test_the_eight_dihedral_views_are_distinct_and_invertible():
    x = torch.arange(16.0).view(1, 4, 4)
    views = [dihedral(x, k) for k in range(8)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    for k, v in enumerate(views):  # undo the rotation, then the flip
        back = torch.rot90(v, -(k % 4), dims=(-2, -1))
        assert torch.equal(back.flip(-1) if k >= 4 else back, x)


def test_batches_cover_every_position_once():
    d = decoded(10)
    y = np.arange(10) % 2
    positions = np.array([0, 2, 3, 5, 7, 9])
    seen = []
    for x, t in training_batches(d, positions, y, batch_size=4, rng=np.random.default_rng(0),
                                 drop_single=False):
        seen += x[:, 0, 0, 0].tolist()
        assert t.tolist() == [v % 2 for v in x[:, 0, 0, 0].tolist()]
    assert sorted(seen) == positions.tolist()


def test_a_batch_of_one_is_dropped_only_when_asked():
    d, y = decoded(5), np.zeros(5, int)
    sizes = [len(x) for x, _ in training_batches(d, np.arange(5), y, batch_size=4,
                                                 rng=np.random.default_rng(0))]
    assert sizes == [4]
    sizes = [len(x) for x, _ in training_batches(d, np.arange(5), y, batch_size=4, rng=None,
                                                 drop_single=False)]
    assert sizes == [4, 1]


def test_weighted_sampling_without_a_generator_is_refused():
    d, y = decoded(5), np.zeros(5, int)
    with pytest.raises(ValueError, match="pass rng"):
        next(training_batches(d, np.arange(5), y, batch_size=4, rng=None, weights=np.ones(5)))


def test_a_weighted_sampler_draws_rare_classes_more_often():
    n = 100
    y = np.array([1] * 10 + [0] * 90)  # class 1 is rare
    d = decoded(n)
    weights = np.where(y == 1, 9.0, 1.0)
    drawn = []
    for _ in range(20):
        for _, t in training_batches(d, np.arange(n), y, batch_size=50, weights=weights,
                                     rng=np.random.default_rng(len(drawn))):
            drawn += t.tolist()
    share = np.mean(drawn)
    assert 0.4 < share < 0.6  # balanced, not 10%


def test_to_input_normalises_channels_last():
    x = torch.full((2, 8, 8, 3), 255, dtype=torch.uint8)
    out = to_input(x, IMAGENET, torch.device("cpu"))
    assert out.shape == (2, 3, 8, 8) and out.is_contiguous(memory_format=torch.channels_last)
    expected = (1 - torch.tensor(IMAGENET.mean)) / torch.tensor(IMAGENET.std)
    assert torch.allclose(out[0, :, 0, 0], expected)


@pytest.mark.parametrize("channels_last", [True, False])
def test_to_input_gives_exactly_the_reference_arithmetic_and_leaves_its_input(channels_last):
    """Issue 29: normalised in place, the values are bit for bit those of (x/255 - mean)/std,
    and a float input (not what the pipeline passes, but possible) is not changed."""
    x = torch.randint(0, 256, (3, 17, 13, 3), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(IMAGENET.mean).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET.std).view(1, 3, 1, 1)
    reference = (x.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    assert torch.equal(to_input(x, IMAGENET, torch.device("cpu"), channels_last), reference)
    floats = x.float()
    to_input(floats, IMAGENET, torch.device("cpu"), channels_last)
    assert torch.equal(floats, x.float())


def test_the_deploy_loader_measures_the_looks_in_its_worker_as_the_model_process_would(tmp_path):
    """Issue 29: the look statistics were 11-12% of a default deploy's main process. The
    decoding worker measures them on the batch it assembles; they equal what the main process
    measured before, and a loader that is not asked for them measures nothing."""
    from PIL import Image

    from thumbclf.inputs.images import Preprocessing
    from thumbclf.nn import look
    from thumbclf.nn.data import stream_loader

    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        img = np.full((60, 80, 3), 235, np.uint8)
        img[10:50, 10 + 5 * i:60] = rng.integers(60, 200, (40, 50 - 5 * i, 3), dtype=np.uint8)
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    prep = Preprocessing(size=32)
    batches = list(stream_loader(paths, prep, batch_size=3, workers=1, pin_memory=False,
                                 looks=True))
    assert [len(b[0]) for b in batches] == [3, 2]
    for _, x, errors, looks in batches:
        assert errors == [""] * len(x)
        stats, fraction = look.parts(looks)
        expected_stats, expected_fraction = look.describe(x)
        assert np.array_equal(stats, expected_stats)
        assert np.array_equal(fraction, expected_fraction)
        assert (fraction > 0.02).all()  # the coloured squares are tissue
    plain = next(iter(stream_loader(paths, prep, batch_size=3, workers=0, pin_memory=False)))
    assert plain[3] is None
