"""Experiment files: strict YAML/JSON reading, ``--set`` overrides, then validation."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
import os
from collections.abc import Mapping
from typing import Any

import yaml

from thumbclf.config.schema import SPELLINGS, Params
from thumbclf.config.rules import validate
from thumbclf.core.errors import ConfigError

DICT_SOURCE = Path("<experiment dict>")  # how error messages name an experiment given as a dict
MAX_EXPERIMENT_BYTES = 1_000_000  # experiment files are a few kB; refuse anything absurd


class _StrictLoader(yaml.SafeLoader):
    """YAML without aliases (no 'billion laughs') and with duplicate keys reported."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) "
                              "are not allowed in experiment files; write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise ConfigError(f"line {line}: a key must be a name, not a "
                                  f"{type(key).__name__}")
            if key in seen:
                raise ConfigError(f"{key}: given twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _json_pairs(text: str):
    def hook(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                lines = [i + 1 for i, line in enumerate(text.splitlines())
                         if re.search(r'"' + re.escape(key) + r'"\s*:', line)]
                where = f" (lines {lines[0]} and {lines[1]})" if len(lines) > 1 else ""
                raise ConfigError(f"{key}: given twice{where}; keep one")
            seen.add(key)
        return dict(pairs)
    return hook


def _json_problem(text: str, exc: json.JSONDecodeError) -> str:
    """Where a JSON file goes wrong; a trailing comma is named at the comma, not at the
    bracket after it."""
    before = text[:exc.pos].rstrip()
    if before.endswith(",") and text[exc.pos:exc.pos + 1] in ("}", "]"):
        comma = len(before) - 1
        line = text.count("\n", 0, comma) + 1
        column = comma - (text.rfind("\n", 0, comma) + 1) + 1
        return (f"line {line}, column {column}: not valid JSON (a comma before "
                f"'{text[exc.pos]}': JSON allows none after the last item; remove it)")
    return (f"line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg}); .json and "
            ".txt experiment files are JSON")


def read_experiment_file(path: Path) -> dict[str, Any]:
    """Parse a YAML or JSON experiment file into a mapping; syntax errors name the line."""
    if not path.is_file():
        raise ConfigError(f"{path}: experiment file not found; check the path")
    suffix = path.suffix.lower()
    try:
        if path.stat().st_size > MAX_EXPERIMENT_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size:,} bytes is too large for an "
                              f"experiment file (at most {MAX_EXPERIMENT_BYTES:,}); is it the "
                              "right file?")
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the experiment file ({exc})") from exc
    try:
        data = parse_experiment_text(text, suffix)
    except ConfigError as exc:
        raise ConfigError(*(f"{path}: {p}" for p in exc.problems)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the experiment file must be a mapping of keys to values; "
                          f"got a {type(data).__name__}")
    return data


def parse_experiment_text(text: str, suffix: str) -> Any:
    """JSON (.json, .txt) or YAML (.yaml, .yml) text -> data; ConfigError without the file name."""
    if suffix in (".json", ".txt"):
        try:
            return json.loads(text, object_pairs_hook=_json_pairs(text))
        except RecursionError:
            raise ConfigError("nested too deeply to be an experiment file") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(_json_problem(text, exc)) from None
    if suffix in (".yaml", ".yml"):
        try:
            return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
        except RecursionError:
            raise ConfigError("nested too deeply to be an experiment file") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{where}not valid YAML ({problem})") from None
    raise ConfigError(f"unknown experiment file type {suffix!r}; use .yaml, .yml, .json or "
                      ".txt (JSON)")


def parse_override(text: str) -> tuple[str, Any]:
    """Split a ``--set KEY=VALUE`` argument; VALUE is read as YAML (numbers, booleans, lists)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. --set max_epochs=5")
    try:
        parsed = yaml.load(value, Loader=_StrictLoader) if value.strip() else None  # noqa: S506
    except (yaml.YAMLError, ConfigError):
        parsed = value
    return key.strip(), parsed


def load_params(path: str | Path, *, workflow: str, overrides: list[str] = (),
                output: str | Path | None = None) -> Params:
    """Read, override and validate an experiment file for ``workflow`` ('train', 'deploy' or 'pretrain')."""
    source = Path(path).absolute()
    given = {parse_override(t)[0]: t for t in overrides}  # key -> the argument as typed
    settings = dict(parse_override(t) for t in overrides)
    unknown_settings(settings, lambda key: f"--set {given[key]}")
    raw = override(read_experiment_file(source), settings)
    out = Path(output).absolute() if output is not None else None
    return validate(raw, workflow=workflow, source=source, output=out)


def unknown_settings(settings: Mapping[str, Any], where) -> None:
    """Keys given outside the file (``--set``, the API's settings) that thumbclf does not know:
    a ConfigError naming where they were given (``where(key)``) and the closest known key."""
    problems = []
    for key in settings:
        if key not in SPELLINGS:
            close = difflib.get_close_matches(key, list(SPELLINGS), n=1, cutoff=0.6)
            problems.append(f"{where(key)}: unknown key"
                            + (f"; did you mean {close[0]!r}?" if close else
                               "; thumbclf init FILE writes every known key"))
    if problems:
        raise ConfigError(*problems)


def plain(value: Any) -> Any:
    """Python values as an experiment file would hold them: paths as strings, tuples as lists,
    numpy scalars (numpy.int64(3), numpy.bool_) as the Python number or bool they hold."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def override(raw: dict[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """Replace keys of ``raw`` by ``settings`` whatever their spelling: the one rule of ``--set``
    and of the API's keyword settings."""
    raw = dict(raw)
    for key, value in settings.items():
        canonical = SPELLINGS.get(key)
        if canonical is not None:
            for spelling in (canonical.name, *canonical.aliases):
                raw.pop(spelling, None)
        raw[key] = plain(value)
    return raw


def load_experiment(experiment: str | os.PathLike | Mapping[str, Any], *, workflow: str,
                    output: str | os.PathLike | None = None,
                    settings: Mapping[str, Any] | None = None) -> tuple[Params, dict | None]:
    """Validated params from an experiment file or dict; also the dict itself (None for a file).

    A file is read like the command line reads it (relative paths start at its folder, the
    results folder defaults to one named after it, beside it). A dict is validated by the same
    rules; its relative paths start at the current directory and ``output`` must be given.
    """
    out = Path(output).absolute() if output is not None else None
    if isinstance(experiment, Mapping):
        raw = override({str(k): plain(v) for k, v in experiment.items()}, settings or {})
        if out is None:
            raise ConfigError(f"{DICT_SOURCE}: output is required when the experiment is a dict "
                              "(the results folder to write), e.g. output='runs/my_run'")
        params = validate(raw, workflow=workflow, source=DICT_SOURCE, output=out, base=Path.cwd())
        return params, raw
    if not isinstance(experiment, (str, os.PathLike)):
        raise ConfigError(f"experiment must be the path of an experiment file or a dict of its "
                          f"keys; got a {type(experiment).__name__}")
    source = Path(experiment).absolute()
    unknown_settings(settings or {}, lambda key: f"{key} (a keyword setting)")
    raw = override(read_experiment_file(source), settings or {})
    return validate(raw, workflow=workflow, source=source, output=out), None

