"""Experiment files -> validated, frozen params objects.

One table (``schema.KEYS``) lists every key: its canonical snake_case name, the spellings of the
original prototype, its type rule, default and meaning. Loading reports every problem of a
file at once, one line each, in the shape ``FILE: KEY must be ...; got VALUE``.
"""

from thumbclf.config.files import (MAX_EXPERIMENT_BYTES, load_params, parse_experiment_text,
                                   parse_override, read_experiment_file)
from thumbclf.config.render import spelling, starter_text, template_text
from thumbclf.config.schema import (ALL, BOTH, DEPLOY, KEY_BY_NAME, KEYS, PARAMS_CLASS, PRETRAIN,
                                    REQUIRED, SPELLINGS, TRAIN, TRAIN_PRETRAIN, WORKFLOW_OF,
                                    DeployParams, Key, Params, PretrainParams, TrainParams,
                                    params_to_dict)
from thumbclf.config.rules import convert, validate

__all__ = ["ALL", "BOTH", "DEPLOY", "KEY_BY_NAME", "KEYS", "MAX_EXPERIMENT_BYTES", "PARAMS_CLASS",
           "PRETRAIN", "REQUIRED", "SPELLINGS", "TRAIN", "TRAIN_PRETRAIN", "WORKFLOW_OF",
           "DeployParams", "Key", "Params", "PretrainParams", "TrainParams", "convert",
           "load_params", "params_to_dict", "parse_experiment_text", "parse_override",
           "read_experiment_file", "spelling", "starter_text", "template_text", "validate"]
