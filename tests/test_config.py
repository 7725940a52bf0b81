import json
from pathlib import Path

import pytest

from thumbclf.decide import threshold_in_force
from thumbclf.config import (DEPLOY, KEYS, TRAIN, DeployParams, TrainParams, load_params,
                             params_to_dict, to_local_path)
from thumbclf.errors import ConfigError

PROTOTYPE_KEYS = ("thumbData, target_labels, modelAdr, batch_size, prediction_threshold, "
                  "max_epochs, seed, model_name, hasLabels, sortThumbs, trainFull, foldNumber, "
                  "lr, wd, patience, stopEpoch, freezeRatio, SSL, cm_xlabels, cm_ylabels, "
                  "cm_sortlabels").split(", ")


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(json.dumps(data) if name.endswith((".json", ".txt")) else data)
    return p


def test_every_prototype_key_is_accepted_as_written(tmp_path):
    data = {"thumbData": "t.csv", "target_labels": ["A", "B"], "modelAdr": "m.pt",
            "batch_size": 8, "prediction_threshold": 0.7, "max_epochs": 3, "seed": 5,
            "model_name": "resnet18", "hasLabels": True, "sortThumbs": True, "trainFull": True,
            "foldNumber": 4, "lr": 0.01, "wd": 0.001, "patience": 2, "stopEpoch": 1,
            "freezeRatio": 0.25, "SSL": True, "cm_xlabels": ["a", "b", "U"],
            "cm_ylabels": ["a", "b"], "cm_sortlabels": ["A", "B"]}
    assert set(data) == set(PROTOTYPE_KEYS)
    p = write(tmp_path, "exp.txt", data)
    t = load_params(p, workflow=TRAIN)
    assert isinstance(t, TrainParams)
    assert (t.batch_size, t.max_epochs, t.seed, t.fold_number, t.patience, t.stop_epoch) == (8, 3, 5, 4, 2, 1)
    assert t.train_full and t.ssl and t.freeze_ratio == 0.25 and t.lr == 0.01 and t.wd == 0.001
    assert t.thumb_data == tmp_path / "t.csv" and t.model_path == (tmp_path / "m.pt",)
    assert t.cm_sortlabels == ("A", "B") and t.prediction_threshold == 0.7
    d = load_params(p, workflow=DEPLOY)
    assert isinstance(d, DeployParams) and d.sort_thumbs and d.has_labels


def test_defaults_match_the_prototype(tmp_path):
    p = write(tmp_path, "e.yaml", "thumbData: data\n")
    t = load_params(p, workflow=TRAIN)
    threshold = threshold_in_force(given=t.prediction_threshold).value
    assert (t.batch_size, threshold, t.max_epochs, t.seed, t.model_name) == (64, 0.9, 50, 1, "resnet18")
    assert (t.train_full, t.fold_number, t.lr, t.wd, t.patience, t.stop_epoch) == (False, 3, 1e-4, 1e-4, 10, 20)
    assert (t.freeze_ratio, t.ssl, t.pretrained) == (0.5, False, True)
    assert t.output == tmp_path / "e"


def test_snake_case_aliases_work_and_both_spellings_are_an_error(tmp_path):
    p = write(tmp_path, "e.yaml", "thumb_data: d\nfold_number: 5\n")
    assert load_params(p, workflow=TRAIN).fold_number == 5
    p = write(tmp_path, "e2.yaml", "thumbData: d\nfoldNumber: 5\nfold_number: 4\n")
    with pytest.raises(ConfigError, match="given twice"):
        load_params(p, workflow=TRAIN)


def test_unknown_key_suggests_the_closest(tmp_path):
    p = write(tmp_path, "e.yaml", "thumbData: d\nfreezeRatoi: 0.5\n")
    with pytest.raises(ConfigError, match=r"freezeRatoi: unknown key; did you mean 'freezeRatio'"):
        load_params(p, workflow=TRAIN)


@pytest.mark.parametrize("line, message", [
    ("freezeRatio: 1.5", r"freezeRatio must be between 0 and 1; got 1.5"),
    ("foldNumber: 1", r"foldNumber must be between 2 and 100; got 1"),
    ("prediction_threshold: 2", r"prediction_threshold must be between 0 and 1"),
    ("batch_size: '64'", r"batch_size must be an integer; got '64'"),
    ("trainFull: 'False'", r"trainFull must be true or false"),
    ("max_epochs: 2.5", r"max_epochs must be an integer"),
    ("target_labels: Tumor", r"target_labels must be a non-empty list"),
    ("model_name: ''", r"model_name must be a non-empty string"),
])
def test_wrong_values_are_named_with_the_rule_and_value(tmp_path, line, message):
    p = write(tmp_path, "e.yaml", f"thumbData: d\n{line}\n")
    with pytest.raises(ConfigError, match=message):
        load_params(p, workflow=TRAIN)


def test_all_problems_are_reported_at_once_each_naming_the_file(tmp_path):
    p = write(tmp_path, "e.yaml", "freezeRatio: 3\nfoldNumber: 0\nbogus: 1\n")
    with pytest.raises(ConfigError) as err:
        load_params(p, workflow=TRAIN)
    lines = str(err.value).splitlines()
    assert len(lines) == 4  # freezeRatio, foldNumber, bogus, missing thumbData
    assert all(line.startswith(str(p)) for line in lines)
    assert any("thumbData is required" in line for line in lines)


def test_deploy_requires_modelAdr_and_ssl_requires_it_too(tmp_path):
    p = write(tmp_path, "e.yaml", "thumbData: d\n")
    with pytest.raises(ConfigError, match="modelAdr is required"):
        load_params(p, workflow=DEPLOY)
    p = write(tmp_path, "e2.yaml", "thumbData: d\nSSL: true\n")
    with pytest.raises(ConfigError, match="modelAdr is required when SSL"):
        load_params(p, workflow=TRAIN)


def test_yaml_scientific_notation_is_read_as_a_number(tmp_path):
    p = write(tmp_path, "e.yaml", "thumbData: d\nlr: 1e-3\n")
    assert load_params(p, workflow=TRAIN).lr == pytest.approx(1e-3)


def test_syntax_errors_name_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("thumbData: d\nlr: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+, column \d+: not valid YAML"):
        load_params(p, workflow=TRAIN)
    p = tmp_path / "bad.txt"
    p.write_text('{\n "thumbData": "d",\n "lr": 0.1,,\n}')
    with pytest.raises(ConfigError, match=r"bad.txt: line 3, column \d+: not valid JSON"):
        load_params(p, workflow=TRAIN)


def test_overrides_replace_any_spelling_and_are_validated(tmp_path):
    p = write(tmp_path, "e.yaml", "thumbData: d\nfoldNumber: 5\n")
    t = load_params(p, workflow=TRAIN, overrides=["fold_number=2", "target_labels=[A, B]"])
    assert t.fold_number == 2 and t.target_labels == ("A", "B")
    with pytest.raises(ConfigError, match="seed must be an integer"):
        load_params(p, workflow=TRAIN, overrides=["seed=abc"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_params(p, workflow=TRAIN, overrides=["seed"])


def test_relative_and_windows_paths(tmp_path):
    assert to_local_path("data\\thumbs\\a.png", tmp_path) == tmp_path / "data" / "thumbs" / "a.png"
    assert to_local_path("/abs/x.png", tmp_path) == Path("/abs/x.png")
    p = write(tmp_path, "e.yaml", "thumbData: sub\\\\table.csv\npretrained: w.pth\n")
    t = load_params(p, workflow=TRAIN)
    assert t.thumb_data == tmp_path / "sub" / "table.csv" and t.pretrained == tmp_path / "w.pth"


def test_cm_tick_label_lengths_are_checked(tmp_path):
    p = write(tmp_path, "e.yaml", "thumbData: d\ntarget_labels: [A, B, C]\ncm_ylabels: [a, b]\n")
    with pytest.raises(ConfigError, match="cm_ylabels must have 3 labels"):
        load_params(p, workflow=TRAIN)


def test_resolved_config_is_plain_data(tmp_path):
    import yaml

    p = write(tmp_path, "e.yaml", "thumbData: d\n")
    d = params_to_dict(load_params(p, workflow=TRAIN))
    assert yaml.safe_load(yaml.safe_dump(d)) == d
    assert {k.name for k in KEYS if TRAIN in k.workflows} <= set(d)


def test_executor_ray_without_ray_says_how_to_install_it(monkeypatch, tmp_path):
    from thumbclf import config

    monkeypatch.setattr(config, "_ray_installed", lambda: False)
    raw = {"thumbData": "x", "modelAdr": "m.pt", "executor": "ray"}
    with pytest.raises(ConfigError) as err:
        config.validate(raw, workflow="deploy", source=tmp_path / "e.yaml")
    assert err.value.lines() == [f'{tmp_path / "e.yaml"}: executor: ray needs Ray, which is not '
                                 'installed; pip install "thumbclf[ray]"']
    p = config.validate({"thumbData": "x", "cpus_per_fold": 2}, workflow="train",
                        source=tmp_path / "e.yaml")
    assert p.executor == "local" and p.ray_address is None and p.cpus_per_fold == 2
