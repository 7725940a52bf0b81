import json
from pathlib import Path

import pytest

from conftest import write_yaml
from thumbclf.cli import main
from thumbclf.config import (DEPLOY, DeployParams, KEYS, TRAIN, TrainParams, load_params,
                             params_to_dict)
from thumbclf.core.decide import threshold_in_force
from thumbclf.core.errors import ConfigError
from thumbclf.core.layout import to_local_path

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


def test_without_pretrained_weights_the_default_freezes_nothing(tmp_path):
    """Issue 31: pretrained: false (the offline error's advice) must not freeze random layers;
    a freezeRatio that is given, and SSL or a weights file, keep theirs."""
    def ratio(text):
        return load_params(write(tmp_path, "e.yaml", "thumbData: data\n" + text),
                           workflow=TRAIN).freeze_ratio

    assert ratio("pretrained: false\n") == 0.0
    assert ratio("pretrained: false\nfreezeRatio: 0.25\n") == 0.25
    assert ratio("pretrained: false\nSSL: true\nmodelAdr: ssl.pt\n") == 0.5
    assert ratio("pretrained: weights.pth\n") == 0.5
    assert ratio("") == 0.5
    given = load_params(write(tmp_path, "e.yaml", "thumbData: d\npretrained: false\n"),
                        workflow=TRAIN).given
    assert "freeze_ratio" not in given


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
    ("batch_size: '2.5'", r"batch_size must be an integer; got '2.5'"),
    ("seed: 'abc'", r"seed must be an integer; got 'abc'"),
    ("lr: 'fast'", r"lr must be a number; got 'fast'"),
    ("lr: .nan", r"lr must be a finite number; got NaN"),
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


def test_prototype_values_are_accepted_as_the_prototype_read_them(tmp_path):
    """0/1 booleans and numbers written as strings: the prototype used bool(), int(), float()."""
    data = {"thumbData": "t.csv", "modelAdr": "m.pt", "hasLabels": 0, "sortThumbs": 1,
            "trainFull": 1, "SSL": 0, "foldNumber": "4", "max_epochs": "8", "seed": " 7 ",
            "patience": "2", "stopEpoch": "1", "lr": "1e-3", "wd": "0.0001",
            "freezeRatio": "0.25", "prediction_threshold": "0.8", "batch_size": 16.0}
    p = write(tmp_path, "proto.txt", data)
    t = load_params(p, workflow=TRAIN)
    assert t.train_full is True and t.ssl is False
    assert (t.fold_number, t.max_epochs, t.seed, t.patience, t.stop_epoch) == (4, 8, 7, 2, 1)
    assert isinstance(t.max_epochs, int) and t.batch_size == 16 and isinstance(t.batch_size, int)
    assert (t.lr, t.wd, t.freeze_ratio, t.prediction_threshold) == (1e-3, 1e-4, 0.25, 0.8)
    d = load_params(p, workflow=DEPLOY)
    assert d.has_labels is False and d.sort_thumbs is True
    for key in ("augment", "calibrate", "tta", "export_thumbnails", "sortSlides"):  # every bool
        assert load_params(write(tmp_path, "b.json", {"thumbData": "t", "modelAdr": "m",
                                                       key: 0}), workflow=DEPLOY) is not None


@pytest.mark.parametrize("value, message", [
    ("False", r"trainFull must be true or false \(or 1 or 0\), not a string: the prototype read "
              r"every non-empty string as true, even \"False\".*; got 'False'$"),
    ("True", r"not a string: the prototype read .*; got 'True'$"),
    ("0", r"not a string.*; got '0'$"),
    (2, r"trainFull must be true or false \(or 1 or 0\); got 2$"),
    (0.5, r"trainFull must be true or false \(or 1 or 0\); got 0.5$"),
    ([1], r"trainFull must be true or false \(or 1 or 0\); got \[1\]$"),
])
def test_booleans_refuse_strings_with_the_reason_and_describe_other_values(tmp_path, value, message):
    p = write(tmp_path, "e.txt", {"thumbData": "d", "trainFull": value})
    with pytest.raises(ConfigError, match=message):
        load_params(p, workflow=TRAIN)


def test_integer_keys_refuse_fractions_and_booleans(tmp_path):
    p = write(tmp_path, "e.txt", {"thumbData": "d", "foldNumber": "2.5", "seed": True,
                                  "max_epochs": 2.5})
    with pytest.raises(ConfigError) as err:
        load_params(p, workflow=TRAIN)
    lines = str(err.value).splitlines()
    assert lines == [f"{p}: foldNumber must be an integer; got '2.5'",
                     f"{p}: seed must be an integer, not true/false; got true",
                     f"{p}: max_epochs must be an integer; got 2.5"]


def test_model_name_is_checked_with_the_file_and_accepts_any_torchvision_classifier(tmp_path):
    p = write(tmp_path, "e.yaml", "thumbData: d\nmodel_name: vgg99\nfreezeRatio: 3\n")
    with pytest.raises(ConfigError) as err:
        load_params(p, workflow=TRAIN)
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{p}: ") for line in lines)
    assert lines[0].startswith(f"{p}: model_name is not a known backbone; did you mean vgg")
    assert "prototype name (resnet, resnet18, alexnet, vgg" in lines[0]
    assert lines[0].endswith("; got 'vgg99'")
    for name in ("convnext_tiny", "regnet_y_800mf", "vgg", "Inception", "efficient"):
        p = write(tmp_path, "ok.yaml", f"thumbData: d\nmodel_name: {name}\n")
        assert load_params(p, workflow=TRAIN).model_name == name
def test_executor_ray_without_ray_says_how_to_install_it(monkeypatch, tmp_path):
    from thumbclf import config
    from thumbclf.config import rules

    monkeypatch.setattr(rules, "_ray_installed", lambda: False)
    raw = {"thumbData": "x", "modelAdr": "m.pt", "executor": "ray"}
    with pytest.raises(ConfigError) as err:
        config.validate(raw, workflow="deploy", source=tmp_path / "e.yaml")
    assert err.value.lines() == [f'{tmp_path / "e.yaml"}: executor: ray needs Ray, which is not '
                                 'installed; pip install "thumbclf[ray]"']
    p = config.validate({"thumbData": "x", "cpus_per_fold": 2}, workflow="train",
                        source=tmp_path / "e.yaml")
    assert p.executor == "local" and p.ray_address is None and p.cpus_per_fold == 2


def test_an_unknown_key_in_set_names_set_and_suggests_the_key(tmp_path):
    """Issue 31: --set max_epoch=1 is a mistake on the command line, not in the file."""
    p = write(tmp_path, "e.yaml", "thumbData: data\n")
    with pytest.raises(ConfigError) as err:
        load_params(p, workflow=TRAIN, overrides=["max_epoch=1", "foldNumbr=2", "lr=0.1"])
    assert err.value.lines() == ["--set max_epoch=1: unknown key; did you mean 'max_epochs'?",
                                 "--set foldNumbr=2: unknown key; did you mean 'foldNumber'?"]
    from thumbclf.config.files import load_experiment

    with pytest.raises(ConfigError, match=r"^max_epoch \(a keyword setting\): unknown key; did "
                                          r"you mean 'max_epochs'\?"):
        load_experiment(p, workflow=TRAIN, settings={"max_epoch": 1})


def test_a_json_trailing_comma_is_named_at_the_comma(tmp_path):
    """Issue 31: the error points at the comma, not at the closing brace after it."""
    p = tmp_path / "e.json"
    p.write_text('{\n  "thumbData": "d",\n  "foldNumber": 3,\n}\n')
    with pytest.raises(ConfigError, match=r"e.json: line 3, column 18: not valid JSON \(a "
                                          r"comma before '}'"):
        load_params(p, workflow=TRAIN)



def test_target_error_is_the_one_rule_for_the_threshold_when_given(tmp_path):
    """Issue 28, item 4: target_error chooses the threshold; a second rule beside it is refused."""
    p = write(tmp_path, "e.yaml", "thumbData: d\ntarget_error: 0.05\n")
    assert load_params(p, workflow=TRAIN).target_error == 0.05
    p = write(tmp_path, "e2.yaml", "thumbData: d\ntarget_error: 0.05\ntarget_accuracy: 0.9\n")
    with pytest.raises(ConfigError, match="target_error chooses the threshold; remove "
                                          "target_accuracy"):
        load_params(p, workflow=TRAIN)


@pytest.mark.parametrize("name,text,message", [
    ("a.yaml", "thumbData: x\nlr: 0.1\nseed: 2\nlr: 0.2\n", "lr: given twice (lines 2 and 4)"),
    ("a.json", '{"thumbData": "x",\n "lr": 0.1,\n "lr": 0.2}', "lr: given twice (lines 2 and 3)"),
    ("b.yaml", "thumbData: x\ntarget_labels: &a [A, B]\ncm_sortlabels: *a\n", "aliases"),
])
def test_duplicate_keys_and_yaml_aliases_are_errors(tmp_path, capsys, name, text, message):
    """Issue 10, item 8: nothing lost."""
    exp = write_yaml(tmp_path / name, text)
    assert main("train", [str(exp)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(exp) in err and len(err.strip().splitlines()) == 1


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path, capsys):
    """Issue 10, item 8: nothing lost."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    exp = write_yaml(tmp_path / "bomb.yaml", "\n".join(lines) + "\nthumbData: *a8\n")
    assert main("train", [str(exp)]) == 2  # refused at the first alias, never expanded
    assert "aliases" in capsys.readouterr().err
