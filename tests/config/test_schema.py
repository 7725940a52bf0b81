"""config/schema.py: the key table is the one home of every key; the params classes follow it."""

import dataclasses

from thumbclf.config.schema import KEYS, PARAMS_CLASS, REQUIRED, SPELLINGS


def test_no_spelling_names_two_keys():
    spellings = [s for k in KEYS for s in (k.name, *k.aliases)]
    assert len(spellings) == len(set(spellings)) == len(SPELLINGS)


def test_every_key_is_a_field_of_the_params_of_each_workflow_that_takes_it():
    for workflow, cls in PARAMS_CLASS.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = [k.name for k in KEYS if workflow in k.workflows and k.name not in fields]
        assert missing == [], (workflow, missing)
        assert set(REQUIRED[workflow]) <= fields


def test_every_default_keeps_its_own_rule():
    for key in KEYS:
        for workflow in key.workflows:
            value = key.default_for(workflow)
            if value is None or isinstance(value, bool):
                continue
            if key.choices:
                assert value in key.choices, key.name
            if key.lo is not None and isinstance(value, (int, float)):
                assert value >= key.lo, key.name
            if key.hi is not None and isinstance(value, (int, float)):
                assert value <= key.hi, key.name
