"""Model files and SSL checkpoints are untrusted input: every field is checked when one is
loaded, before anything is built from it (a model of ``input_size`` pixels, a feature bank of
``shape`` rows), so a damaged or altered file ends with one line naming the field, never an
out-of-memory kill or silently wrong probabilities.

The rules are what thumbclf itself writes, with room for other backbones: an input size of
MIN_INPUT_SIZE-MAX_INPUT_SIZE pixels, at least two distinct class names, a finite positive
temperature, a threshold in [0, 1], finite weights, and for the unfamiliar-slide rule a bank
of at most MAX_BANK_ROWS rows of the model's feature size, a k between 1 and its rows, a
finite positive threshold and a quantile in (0, 1].
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from thumbclf.core.errors import ModelError
from thumbclf.nn import look

MIN_INPUT_SIZE, MAX_INPUT_SIZE = 16, 2048
MAX_SLIDE_SIZE = 16384
MAX_BANK_ROWS = 16384  # thumbclf writes at most familiarity.BANK_SIZE (1024)
MAX_FEATURES = 16384
RECIPES = ("thumbclf", "legacy")
CALIBRATION_STATUS = ("fitted", "separable", "skipped", "off")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _vector(x: Any) -> bool:
    return (isinstance(x, (list, tuple)) and len(x) == 3 and all(_number(v) for v in x))


def non_finite_tensors(state: Any) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold NaN or infinity."""
    if not isinstance(state, dict):
        return []
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not bool(torch.isfinite(v).all())]


def non_finite_problem(state: dict, what: str = "the model") -> str | None:
    """The one refusal of weights that are NaN or infinite (a training that diverged, or a
    damaged file), or None where every tensor is finite."""
    bad = non_finite_tensors(state)
    if not bad:
        return None
    return (f"{len(bad)} tensors hold NaN or infinite weights (first: {bad[0]}); {what} "
            "diverged in training or the file is damaged")


def _state_problems(state: Any) -> list[str]:
    if not isinstance(state, dict) or not state:
        return ["state_dict: missing or not a dictionary of weights"]
    odd = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        return [f"state_dict: {len(odd)} entries are not named tensors (first: {str(odd[0])[:80]})"]
    problem = non_finite_problem(state)
    return [f"state_dict: {problem}"] if problem else []


def _common(obj: dict, version: int) -> list[str]:
    problems = []
    v = obj.get("format_version")
    if not _integer(v) or v < 1:
        problems.append(f"format_version must be a whole number from 1; got {v!r}")
    elif v > version:
        problems.append(f"format_version {v}: made by a newer thumbclf (this one reads up to "
                        f"{version}); update thumbclf")
    if not isinstance(obj.get("arch"), str) or not obj["arch"]:
        problems.append(f"arch must name a backbone; got {obj.get('arch')!r}")
    size = obj.get("input_size")
    if not _integer(size) or not MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE:
        problems.append(f"input_size must be a whole number of pixels from {MIN_INPUT_SIZE} to "
                        f"{MAX_INPUT_SIZE}; got {size!r}")
    if obj.get("recipe", "thumbclf") not in RECIPES:
        problems.append(f"recipe must be one of {', '.join(RECIPES)}; got {obj.get('recipe')!r}")
    slide = obj.get("slide_size", 1024)
    if not _integer(slide) or not MIN_INPUT_SIZE <= slide <= MAX_SLIDE_SIZE:
        problems.append(f"slide_size must be a whole number of pixels from {MIN_INPUT_SIZE} to "
                        f"{MAX_SLIDE_SIZE}; got {slide!r}")
    if not _vector(obj.get("mean")):
        problems.append(f"mean must be 3 finite numbers; got {str(obj.get('mean'))[:60]}")
    std = obj.get("std")
    if not _vector(std) or any(s <= 0 for s in std):
        problems.append(f"std must be 3 finite numbers above 0; got {str(std)[:60]}")
    return problems


def _bank_problems(name: str, bank: Any, max_dim: int) -> tuple[list[str], int]:
    """What is wrong with a feature bank (a 2-D float tensor of thumbclf's making); its rows."""
    if not isinstance(bank, torch.Tensor) or bank.dim() != 2 or not bank.is_floating_point():
        got = tuple(bank.shape) if isinstance(bank, torch.Tensor) else type(bank).__name__
        return [f"{name} must be a 2-D tensor of floats; got {got}"], 0
    rows, dim = bank.shape
    if not 1 <= rows <= MAX_BANK_ROWS or not 1 <= dim <= max_dim:
        return [f"{name} has shape {tuple(bank.shape)}; it holds 1 to {MAX_BANK_ROWS} rows of 1 "
                f"to {max_dim} features"], rows
    if 0 in bank.stride() or bank.untyped_storage().nbytes() < bank.numel() * bank.element_size():
        return [f"{name} of shape {tuple(bank.shape)} has repeated (stride-0) rows; it is not a "
                "bank thumbclf writes"], rows
    if not bool(torch.isfinite(bank).all()):
        return [f"{name} holds NaN or infinite features"], rows
    return [], rows


def _rule_problems(name: str, rule: dict, rows: int) -> list[str]:
    """k and threshold of a rule (its content or its look part)."""
    problems = []
    k = rule.get("k")
    if not _integer(k) or not 1 <= k <= max(rows, 1):
        problems.append(f"{name}.k must be a whole number from 1 to the bank's rows "
                        f"({rows}); got {k!r}")
    t = rule.get("threshold")
    if not _number(t) or t <= 0:
        problems.append(f"{name}.threshold must be a finite number above 0; got {t!r}")
    return problems


def _familiarity_problems(fam: Any) -> list[str]:
    if fam is None:
        return []
    if not isinstance(fam, dict):
        return [f"familiarity must be a dictionary; got {type(fam).__name__}"]
    problems, rows = _bank_problems("familiarity.bank", fam.get("bank"), MAX_FEATURES)
    problems += _rule_problems("familiarity", fam, rows)
    q = fam.get("quantile")
    if not _number(q) or not 0 < q <= 1:
        problems.append(f"familiarity.quantile must be a number in (0, 1]; got {q!r}")
    return problems + _look_problems(fam.get("look"))


def _look_problems(part: Any) -> list[str]:
    """The look part of the rule (thumbclf 1.3 on; absent before)."""
    if part is None:
        return []
    if not isinstance(part, dict):
        return [f"familiarity.look must be a dictionary; got {type(part).__name__}"]
    dim = len(look.NAMES)
    problems, rows = _bank_problems("familiarity.look.bank", part.get("bank"), dim)
    if not problems and part["bank"].shape[1] != dim:
        problems.append(f"familiarity.look.bank has {part['bank'].shape[1]} statistics per row; "
                        f"this thumbclf computes {dim}")
    for field in ("centre", "scale"):
        v = part.get(field)
        if not (isinstance(v, torch.Tensor) and v.shape == (dim,) and v.is_floating_point()
                and bool(torch.isfinite(v).all()) and (field == "centre" or bool((v > 0).all()))):
            problems.append(f"familiarity.look.{field} must be {dim} finite numbers"
                            f"{' above 0' if field == 'scale' else ''}")
    return problems + _rule_problems("familiarity.look", part, rows)


def _calibration_problems(cal: Any) -> list[str]:
    if not cal:
        return []
    if not isinstance(cal, dict):
        return [f"calibration must be a dictionary; got {type(cal).__name__}"]
    problems = []
    if not _number(cal.get("temperature")) or cal["temperature"] <= 0:
        problems.append(f"calibration.temperature must be a finite number above 0; got "
                        f"{cal.get('temperature')!r}")
    if cal.get("status") not in CALIBRATION_STATUS:
        problems.append(f"calibration.status must be one of {', '.join(CALIBRATION_STATUS)}; got "
                        f"{cal.get('status')!r}")
    if not _integer(cal.get("images")) or cal["images"] < 0:
        problems.append(f"calibration.images must be a whole number; got {cal.get('images')!r}")
    return problems


def check_model(path: Path, obj: dict, version: int) -> None:
    """Every field of a thumbclf model file; ModelError naming each bad field otherwise."""
    problems = _common(obj, version)
    classes = obj.get("classes")
    if (not isinstance(classes, (list, tuple)) or len(classes) < 2
            or not all(isinstance(c, str) and c.strip() for c in classes)):
        problems.append(f"classes must list at least 2 class names; got {str(classes)[:80]}")
    elif len(set(classes)) != len(classes):
        twice = sorted({c for c in classes if classes.count(c) > 1})
        problems.append(f"classes must be distinct; {', '.join(twice)} appear twice")
    t = obj.get("threshold")
    if t is not None and (not _number(t) or not 0 <= t <= 1):
        problems.append(f"threshold must be a number between 0 and 1 (or absent); got {t!r}")
    temp = obj.get("temperature", 1.0)
    if not _number(temp) or temp <= 0:
        problems.append(f"temperature must be a finite number above 0; got {temp!r}")
    if not isinstance(obj.get("meta", {}), dict):
        problems.append(f"meta must be a dictionary; got {type(obj.get('meta')).__name__}")
    problems += _familiarity_problems(obj.get("familiarity"))
    problems += _calibration_problems(obj.get("calibration"))
    problems += _state_problems(obj.get("state_dict"))
    _raise(path, problems, "train again, or copy the model file again")


def check_ssl(path: Path, obj: dict, version: int) -> None:
    """Every field of a thumbclf pretraining checkpoint; ModelError naming each bad field."""
    problems = _common(obj, version) + _state_problems(obj.get("state_dict"))
    _raise(path, problems, "pretrain again, or copy the checkpoint again")


def check_feature_size(path: Path, bank_dim: int, features: int) -> None:
    """The bank's feature size is the model's (the input size of its head)."""
    if bank_dim != features:
        _raise(path, [f"familiarity.bank has {bank_dim} features per row, but the model's head "
                      f"takes {features}"], "train again, or copy the model file again")


def _raise(path: Path, problems: list[str], what: str) -> None:
    if problems:
        raise ModelError(*(f"{path}: {p}; {what}" for p in problems))
