import numpy as np
import pytest

from thumbclf.inputs.splits import load, make_splits, positions, save


def labels(n_per=(12, 8, 6)):
    return [c for c, n in zip("ABC", n_per) for _ in range(n)]


@pytest.mark.parametrize("grouped", [False, True])
def test_cross_validation_folds(grouped):
    y = labels()
    groups = [f"{c}{i // 2}" for i, c in enumerate(y)] if grouped else None
    df = make_splits(y, groups, folds=3, full=False, val_fraction=0.2, seed=4)
    tests = np.concatenate([positions(df, f, "test") for f in (1, 2, 3)])
    assert sorted(tests) == list(range(len(y)))  # every image exactly once in a test set
    for f in (1, 2, 3):
        tr, va, te = (set(positions(df, f, r)) for r in ("train", "val", "test"))
        assert not (tr & va or tr & te or va & te) and len(tr | va | te) == len(y)
        assert {y[i] for i in te} == {"A", "B", "C"}  # stratified
        assert va and ({y[i] for i in va} == {"A", "B", "C"} or grouped)
        if grouped:
            g = np.array(groups)
            assert not (set(g[list(tr)]) & set(g[list(te)]))
            assert not (set(g[list(tr)]) & set(g[list(va)]))


def test_splits_are_seeded():
    y = labels()
    a = make_splits(y, None, folds=3, full=False, val_fraction=0.2, seed=1)
    b = make_splits(y, None, folds=3, full=False, val_fraction=0.2, seed=1)
    c = make_splits(y, None, folds=3, full=False, val_fraction=0.2, seed=2)
    assert a.equals(b) and not a.equals(c)


def test_full_training_has_train_and_validation_only():
    y = labels()
    df = make_splits(y, None, folds=3, full=True, val_fraction=0.25, seed=1)
    assert set(df["role"]) == {"train", "val"} and set(df["fold"]) == {0}
    va = positions(df, 0, "val")
    assert len(va) == round(0.25 * len(y)) and len(set(va)) == len(va)


def test_resuming_refuses_splits_whose_labels_changed(tmp_path):
    """Issue 33, item 7: after the corrections table (or thumbData's labels) changed, a
    resumed cross-validation trained fold 1 on the old labels and fold 2 on the new, exit 0:
    the check compared paths, not labels."""
    from thumbclf.core.errors import DataError

    y = labels()
    paths = [f"/data/img{i}.png" for i in range(len(y))]
    df = make_splits(y, None, folds=2, full=False, val_fraction=0.2, seed=0)
    save(df, paths, y, None, tmp_path / "splits.csv")
    assert len(load(tmp_path / "splits.csv", paths, y)) == len(df)
    changed = list(y)
    changed[3] = "C" if y[3] != "C" else "A"
    with pytest.raises(DataError, match=r"splits\.csv: the labels of 1 images differ .*img3\.png"):
        load(tmp_path / "splits.csv", paths, changed)
