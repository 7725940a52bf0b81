"""Text made from the key table: experiments/template.yaml and ``thumbclf init``'s starter file."""

from __future__ import annotations

import textwrap

import yaml

from thumbclf.config.schema import ALL, DEPLOY, KEYS, PRETRAIN, REQUIRED, TRAIN, Key


def default_value(value) -> str:
    """A default as the template, init's files and the keys reference all write it: small
    numbers as 1e-4 (as the key table's docs say them), others as YAML writes them."""
    if isinstance(value, float) and not isinstance(value, bool):
        if value and abs(value) <= 1e-3:
            mantissa, exponent = f"{value:.0e}".split("e")
            if float(mantissa) * 10 ** int(exponent) == value:
                return f"{mantissa}e{int(exponent)}"
        return str(int(value)) if value.is_integer() else repr(value)
    value = yaml.safe_dump(value, default_flow_style=True).strip()
    return value.removesuffix("...").strip()


def spelling(key: Key) -> str:
    """The spelling used in docs: the prototype's where it had one."""
    legacy = [a for a in key.aliases if a not in ("learning_rate", "weight_decay")]
    return legacy[0] if legacy else key.name


def template_text() -> str:
    """experiments/template.yaml: every key with its meaning and default (kept in sync by a test)."""
    lines = ["# thumbclf experiment file: every key, its meaning and its default.",
             "# Copy this file, delete what you don't need (absent keys take their defaults) and",
             "# set thumbData (and modelAdr for deploy). YAML (.yaml/.yml) or JSON (.json, or .txt",
             "# as the prototype wrote them). The prototype's spellings (thumbData, foldNumber, ...)",
             "# and the snake_case names (thumb_data, fold_number, ...) both work; give only one.",
             "# Relative paths start at this file's folder. Keys marked [train], [deploy] or",
             "# [pretrain] are used by those scripts only; the others accept and ignore them.",
             "# Booleans are true or false (or 1/0, as the prototype read them; never strings),",
             "# numbers may be quoted.", ""]
    for key in KEYS:
        name = spelling(key)
        where = "" if set(key.workflows) == set(ALL) else f"[{', '.join(key.workflows)}] "
        others = [a for a in (key.name, *key.aliases) if a != name]
        also = f" (also: {', '.join(others)})" if others else ""
        lines += ["# " + line for line in textwrap.wrap(where + key.doc + also, 90)]
        if key.name == "thumb_data":
            value = "data/labels.csv"
        elif key.name == "model_path":
            value = "null   # deploy: a training results folder, a model.pt, or a list of them"
        else:
            value = default_value(key.default)
        lines += [f"{name}: {value}", ""]
    return "\n".join(lines)


STARTER_VALUES = {"thumb_data": "data/labels.csv   # a table (PATH, CLASSIFICATION) or a folder",
                  "model_path": "my_training   # a training results folder, a model.pt, or a list"}
# deploy's starter serves its main use: an unlabelled folder of slides (any layout)
DEPLOY_STARTER = {"thumb_data": "slides/   # a folder of slides or thumbnails (any layout), or a "
                                "table with a PATH column",
                  "has_labels": "false   # true when thumbData has labels (CLASSIFICATION or one "
                                "folder per class): then the run is also evaluated"}


def starter_text(workflow: str | None = None) -> str:
    """``thumbclf init``: the required keys set to examples, the others commented out with their
    defaults and meanings; ``workflow`` None serves training and deployment."""
    what = {TRAIN: "training", DEPLOY: "deployment", PRETRAIN: "self-supervised pretraining",
            None: "training and deployment"}[workflow]
    lines = [f"# thumbclf experiment file for {what}, written by 'thumbclf init'.",
             "# Set the keys that are not commented out. Every other key takes the default shown;",
             "# remove the '# ' in front of one to change it. Relative paths start at this file's",
             "# folder. The prototype's spellings (thumbData, foldNumber, ...) and the snake_case",
             "# names (thumb_data, fold_number, ...) both work.", ""]
    serves = (workflow,) if workflow is not None else (TRAIN, DEPLOY)
    for key in KEYS:
        used = [w for w in serves if w in key.workflows]
        if not used:
            continue
        where = "" if len(used) == len(serves) else f"[{used[0]}] "
        lines += ["# " + line for line in textwrap.wrap(where + key.doc, 90)]
        lines += [_starter_line(key, workflow), ""]
    return "\n".join(lines)


def _starter_line(key: Key, workflow: str | None) -> str:
    """One key's line in a starter file: set when required (or deploy's hasLabels), else
    commented out with its default."""
    name = spelling(key)
    if workflow == DEPLOY and key.name in DEPLOY_STARTER:
        return f"{name}: {DEPLOY_STARTER[key.name]}"
    if key.name in REQUIRED[workflow or TRAIN]:
        return f"{name}: {STARTER_VALUES[key.name]}"
    if key.name == "model_path":
        return f"# {name}: {STARTER_VALUES['model_path']}"
    return f"# {name}: {default_value(key.default_for(workflow or TRAIN))}"


if __name__ == "__main__":  # python -m thumbclf.config.render > experiments/template.yaml
    print(template_text(), end="")
