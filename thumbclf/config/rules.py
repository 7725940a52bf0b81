"""Validation of an experiment's raw values against the key table: every problem at once, in
the shape ``FILE: KEY must be ...; got VALUE``."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from pathlib import Path
from typing import Any

from thumbclf.config.schema import (KEY_BY_NAME, PARAMS_CLASS, REQUIRED, SPELLINGS, TRAIN, Key,
                                    Params)
from thumbclf.core.errors import ConfigError, ModelError
from thumbclf.core.layout import to_local_path
from thumbclf.outputs.confusion import cm_problems


def _check_number(key: Key, value: Any, kind: type) -> Any:
    what = "an integer" if kind is int else "a number"
    if isinstance(value, bool):
        raise ValueError(f"must be {what}, not true/false")
    if isinstance(value, str):  # the prototype used int()/float(); YAML 1.1 reads 1e-4 as text
        try:
            value = kind(value.strip())
        except ValueError:
            raise ValueError(f"must be {what}") from None
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ValueError("must be an integer")
    elif not isinstance(value, (int, float)):
        raise ValueError("must be a number")
    elif not math.isfinite(value):
        raise ValueError("must be a finite number")
    else:
        value = float(value)
    if (key.lo is not None and value < key.lo) or (key.hi is not None and value > key.hi):
        raise ValueError(f"must be between {key.lo:g} and {key.hi:g}")
    return value


BOOL_RULE = "must be true or false (or 1 or 0)"


def _check_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):  # the prototype's bool(0) and bool(1)
        return bool(value)
    if isinstance(value, str):
        raise ValueError(f"{BOOL_RULE}, not a string: the prototype read every non-empty "
                         "string as true, even \"False\", so thumbclf will not guess; write "
                         "true or false without quotes")
    raise ValueError(BOOL_RULE)


def _labels(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of labels")
    bad = [v for v in value if not isinstance(v, (str, int)) or isinstance(v, bool)]
    if bad:
        raise ValueError("must be a list of label strings")
    labels = tuple(str(v) for v in value)
    dupes = sorted({v for v in labels if labels.count(v) > 1})
    if dupes:
        raise ValueError(f"lists {', '.join(dupes)} more than once")
    return labels


def convert(key: Key, value: Any, base: Path) -> Any:
    """Check one value against its key's rule; return it in its typed form or raise ValueError."""
    if value is None:
        if key.default is None or key.rule == "threshold":
            return None
        raise ValueError("must not be empty")
    rule = key.rule
    if rule == "bool":
        return _check_bool(value)
    if rule == "int":
        return _check_number(key, value, int)
    if rule in ("float", "threshold"):
        return _check_number(key, value, float)
    if rule == "str":
        if not isinstance(value, str) or not value.strip():
            raise ValueError("must be a non-empty string")
        return value.strip()
    if rule == "model":
        if not isinstance(value, str) or not value.strip():
            raise ValueError("must be a non-empty string")
        from thumbclf.core.backbones import (  # imports torch: only when a name is given
            arch_name,
            name_rule,
        )

        try:
            arch_name(value)
        except ModelError:
            raise ValueError(f"is not a known backbone; {name_rule(value)}") from None
        return value.strip()
    if rule == "choice":
        if value not in key.choices:
            raise ValueError(f"must be one of {', '.join(key.choices)}")
        return value
    if rule == "labels":
        return _labels(value)
    if rule == "path":
        if not isinstance(value, str) or not value.strip():
            raise ValueError("must be a path (a string)")
        return to_local_path(value.strip(), base)
    if rule == "paths":
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, str) and v.strip() for v in items):
            raise ValueError("must be a path or a list of paths")
        return tuple(to_local_path(v.strip(), base) for v in items)
    if rule == "pretrained":
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        if isinstance(value, str) and value.strip():
            return to_local_path(value.strip(), base)
        raise ValueError("must be true, false or the path of a weights file")
    raise AssertionError(f"unknown rule {rule}")


def _show(value: Any) -> str:
    text = json.dumps(value, default=repr) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validate(raw: dict[str, Any], *, workflow: str, source: Path, output: Path | None = None,
             base: Path | None = None, need: tuple[str, ...] | None = None) -> Params:
    """Turn a raw mapping into the workflow's params; raise ConfigError listing every problem.
    ``need``: the keys that must be given (default: the workflow's REQUIRED; the Python API's
    load_model needs only modelAdr, as it has no images yet)."""
    base = base if base is not None else source.parent
    problems: list[str] = []
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for spelling, value in raw.items():
        key = SPELLINGS.get(str(spelling))
        if key is None:
            close = difflib.get_close_matches(str(spelling), list(SPELLINGS), n=1, cutoff=0.6)
            hint = (f"; did you mean {close[0]!r}?" if close
                    else "; thumbclf init FILE writes every known key")
            problems.append(f"{spelling}: unknown key{hint}")
            continue
        if key.name in spelled:
            problems.append(f"{spelling}: given twice (also as {spelled[key.name]!r}); keep one")
            continue
        spelled[key.name] = str(spelling)
        if workflow not in key.workflows:
            continue  # e.g. sortThumbs in a training file: accepted, not used
        try:
            values[key.name] = convert(key, value, base)
        except ValueError as exc:
            problems.append(f"{spelling} {exc}; got {_show(value)}")
    for name in REQUIRED[workflow] if need is None else need:
        if values.get(name) in (None, ()):
            key = KEY_BY_NAME[name]
            spelling = key.aliases[0] if key.aliases else name
            problems.append(f"{spelling} is required ({key.doc.split(';')[0].rstrip('.')})")
    if workflow == TRAIN and values.get("ssl") and not values.get("model_path"):
        problems.append("modelAdr is required when SSL is true (the SSL checkpoint to start from)")
    if workflow == TRAIN and values.get("model_path") and len(values["model_path"]) > 1:
        problems.append("modelAdr must be one checkpoint for training with SSL; got a list")
    if values.get("executor") == "ray" and not _ray_installed():
        problems.append('executor: ray needs Ray, which is not installed; pip install '
                        '"thumbclf[ray]"')
    if values.get("ray_address") and values.get("executor") != "ray":
        problems.append("ray_address is only used with executor: ray; add executor: ray or "
                        "remove ray_address")
    chosen = [k for k in ("target_error", "target_accuracy", "prediction_threshold")
              if values.get(k) is not None]
    if workflow == TRAIN and "target_error" in chosen and len(chosen) > 1:
        problems.append(f"target_error chooses the threshold; remove {' and '.join(chosen[1:])}")
    if values.get("target_labels"):  # classes known now: check the confusion-matrix labels
        problems += cm_problems(values["target_labels"], values.get("cm_sortlabels"),
                                values.get("cm_xlabels"), values.get("cm_ylabels"))[1]
    if problems:
        raise ConfigError(*(f"{source}: {p}" for p in problems))
    cls = PARAMS_CLASS[workflow]
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in values.items() if k in names and v is not None}
    if workflow == TRAIN and "freeze_ratio" not in values and not starts_trained(values):
        kwargs["freeze_ratio"] = 0.0  # freezing layers at random initialisation helps nobody
    if output is None:
        output = source.parent / source.stem
    return cls(source=source, output=output, given=frozenset(values), **kwargs)


def starts_trained(values: dict[str, Any]) -> bool:
    """Whether training starts from trained weights (ImageNet, a weights file or an SSL
    checkpoint): only then does the default freezeRatio freeze anything."""
    pretrained = values.get("pretrained", KEY_BY_NAME["pretrained"].default)
    return bool(values.get("ssl")) or pretrained is not False


def _ray_installed() -> bool:
    """Whether Ray can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None
