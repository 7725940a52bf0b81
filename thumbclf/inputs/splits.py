"""Stratified (and patient-grouped) folds and validation splits, written once and reused."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import (GroupShuffleSplit, StratifiedGroupKFold, StratifiedKFold,
                                     StratifiedShuffleSplit)

from thumbclf.core import layout
from thumbclf.core.errors import DataError
from thumbclf.core.files import atomic_csv
from thumbclf.core.table import LABEL, PATH, PATIENT, read_csv, text


def _val_split(y: np.ndarray, groups: np.ndarray | None, fraction: float,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into y) of a stratified train/validation split, disjoint, patient-grouped."""
    n = len(y)
    if groups is not None:
        per_class = min(len(np.unique(groups[y == c])) for c in np.unique(y))
        k = max(2, min(round(1 / fraction), per_class))
        try:
            splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            with warnings.catch_warnings():  # "least populated class" is expected on small data
                warnings.simplefilter("ignore", UserWarning)
                tr, va = next(splitter.split(np.zeros(n), y, groups))
        except ValueError:  # too few patients to stratify: whole patients at random
            splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
            tr, va = next(splitter.split(np.zeros(n), y, groups))
        return np.sort(tr), np.sort(va)
    n_classes = len(np.unique(y))
    n_val = min(max(round(fraction * n), n_classes), n - n_classes)
    if n_val < 1:
        raise DataError(f"too few images ({n}) for a validation split; add images")
    try:
        tr, va = next(StratifiedShuffleSplit(1, test_size=n_val, random_state=seed)
                      .split(np.zeros(n), y))
    except ValueError:  # a class with a single member: split without stratification
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        va, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return np.sort(tr), np.sort(va)


def make_splits(y: list[str], groups: list[str] | None, *, folds: int, full: bool,
                val_fraction: float, seed: int) -> pd.DataFrame:
    """One row per (image position, fold): role train, val or test. fold 0 = full training."""
    y_arr = np.asarray(y)
    g_arr = np.asarray(groups) if groups is not None else None
    rows = []
    if full:
        tr, va = _val_split(y_arr, g_arr, val_fraction, seed)
        rows += [(int(i), 0, "train") for i in tr] + [(int(i), 0, "val") for i in va]
    else:
        if g_arr is not None:
            outer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
            parts = outer.split(np.zeros(len(y_arr)), y_arr, g_arr)
        else:
            outer = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            parts = outer.split(np.zeros(len(y_arr)), y_arr)
        for fold, (rest, test) in enumerate(parts, start=1):
            tr, va = _val_split(y_arr[rest], g_arr[rest] if g_arr is not None else None,
                                val_fraction, seed + fold)
            rows += [(int(i), fold, "test") for i in test]
            rows += [(int(rest[i]), fold, "train") for i in tr]
            rows += [(int(rest[i]), fold, "val") for i in va]
    df = pd.DataFrame(rows, columns=["position", "fold", "role"])
    return df.sort_values(["fold", "position"], kind="stable").reset_index(drop=True)


def positions(splits: pd.DataFrame, fold: int, role: str) -> np.ndarray:
    """Image positions of one role in one fold."""
    sel = splits[(splits["fold"] == fold) & (splits["role"] == role)]
    return sel["position"].to_numpy()


def save(splits: pd.DataFrame, paths: list[str], labels: list[str], patients: list[str] | None,
         path: Path) -> None:
    """Write splits.csv with the image path and label on every row."""
    out = splits.copy()
    out.insert(1, PATH, text([paths[i] for i in out["position"]], out.index))
    out.insert(2, LABEL, text([labels[i] for i in out["position"]], out.index))
    if patients is not None:
        out.insert(3, PATIENT, text([patients[i] for i in out["position"]], out.index))
    atomic_csv(out, path)


def validation_of_model(model_file: Path) -> list[tuple[Path, str]]:
    """(path, label) of the validation split a model of a training results folder was
    calibrated on, from the run's splits.csv; empty when there is none."""
    fold = layout.fold_of(model_file.parent)
    run = model_file.parent.parent if fold is not None else model_file.parent
    split_file = run / layout.SPLITS
    try:
        df = read_csv(split_file, numeric=["position", "fold"])
        rows = df[(df["fold"] == (fold or 0)) & (df["role"] == "val")]
        return [(Path(p), lab) for p, lab in zip(rows[PATH], rows[LABEL])]
    except (OSError, ValueError, KeyError, pd.errors.ParserError):
        return []


def load(path: Path, paths: list[str], labels: list[str] | None = None) -> pd.DataFrame:
    """Read splits.csv for resuming; refuse it if the images or their labels (a changed
    corrections table, issue 33) changed since: the finished folds learnt the old ones."""
    df = read_csv(path, numeric=["position", "fold"])
    if len(df) == 0 or df["position"].max() >= len(paths) or any(
            paths[p] != q for p, q in zip(df["position"], df[PATH])):
        raise DataError(f"{path}: the images differ from those of the interrupted run; "
                        "start a new run (without --resume) or restore the input")
    if labels is not None and LABEL in df:
        changed = sorted({int(p) for p, old in zip(df["position"], df[LABEL])
                          if str(labels[p]) != str(old)})
        if changed:
            first = changed[0]
            old = df.loc[df["position"] == first, LABEL].iloc[0]
            raise DataError(f"{path}: the labels of {len(changed)} images differ from those of "
                            f"the interrupted run (e.g. {paths[first]}: {old!r} then, "
                            f"{labels[first]!r} now; a changed table or corrections); its "
                            "finished folds learnt the old labels: start a new run (without "
                            "--resume) or restore the labels")
    return df[["position", "fold", "role"]]
