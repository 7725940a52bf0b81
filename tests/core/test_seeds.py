"""core/seeds.py: every random stream of a run by name (issue 32, item 2). The streams must
give the numbers thumbclf 1.2 gave (the formulas that were written out in the workflows), so
that a seed reproduces an earlier run."""

import numpy as np
import torch

from thumbclf.core.seeds import Streams


def same_numpy(a: np.random.Generator, b: np.random.Generator) -> bool:
    return np.array_equal(a.random(8), b.random(8))


def test_a_folds_streams_are_the_earlier_ones():
    s = Streams(seed=5, fold=2, rank=1)
    assert s.init == 5002 and s.feature_bank == 5002 and s.looks == 5013 and s.bank == [5, 2, 2]
    assert same_numpy(s.batches(), np.random.default_rng([5, 2]))
    assert same_numpy(s.bn_sample(), np.random.default_rng([5, 2, 1]))
    want = torch.Generator().manual_seed(5 * 1000 + 2 + 7 + 100_003)
    assert torch.equal(torch.rand(4, generator=s.augmentation()), torch.rand(4, generator=want))


def test_pretrainings_streams_are_the_earlier_ones_and_differ_from_every_folds():
    p = Streams.pretraining(5)
    assert p.init == 5
    assert same_numpy(p.batches(), np.random.default_rng([5, 16]))
    assert same_numpy(p.bn_sample(), np.random.default_rng([5, 17]))
    want = torch.Generator().manual_seed(5016)
    assert torch.equal(torch.rand(4, generator=p.augmentation()), torch.rand(4, generator=want))
    draws = {Streams(5, f).batches().random() for f in range(16)} | {p.batches().random()}
    assert len(draws) == 17
