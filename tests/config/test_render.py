"""config/render.py: the template and ``thumbclf init``'s starter files, made from the key table."""

import yaml

from thumbclf.config import DEPLOY, KEYS, TRAIN
from thumbclf.config.render import default_value, spelling, starter_text, template_text


def test_defaults_are_written_as_the_key_tables_docs_say_them():
    assert default_value(1e-4) == "1e-4" and default_value(0.001) == "1e-3"
    assert default_value(2.0) == "2" and default_value(0.5) == "0.5"
    assert default_value(True) == "true" and default_value(None) == "null"
    assert default_value([1, 2]) == "[1, 2]"


def test_the_template_parses_and_sets_every_key_once_by_its_documented_spelling():
    values = yaml.safe_load(template_text())
    assert sorted(values) == sorted(spelling(k) for k in KEYS)
    assert values["thumbData"] == "data/labels.csv" and values["modelAdr"] is None


def test_a_starter_file_sets_only_what_its_workflow_needs():
    assert yaml.safe_load(starter_text(TRAIN)) == {"thumbData": "data/labels.csv"}
    deploy = yaml.safe_load(starter_text(DEPLOY))
    assert deploy == {"thumbData": "slides/", "modelAdr": "my_training", "hasLabels": False}
    assert "\n# foldNumber: 3\n" in starter_text(TRAIN)  # commented out with its default
    assert "\n# foldNumber:" not in starter_text(DEPLOY)  # a training key
