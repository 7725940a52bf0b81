"""The documentation matches the code: template, README key reference, quick start."""

import yaml

from conftest import ROOT
from thumbclf.config import KEYS, TRAIN, spelling, template_text, validate


def test_template_lists_every_key_and_is_current():
    text = (ROOT / "experiments" / "template.yaml").read_text()
    assert text == template_text(), "regenerate: python -m thumbclf.config.render > experiments/template.yaml"
    data = yaml.safe_load(text)
    assert set(data) == {spelling(k) for k in KEYS}
    validate(data, workflow=TRAIN, source=ROOT / "experiments" / "template.yaml")


def test_readme_documents_every_key_and_the_two_quick_start_commands():
    readme = (ROOT / "README.md").read_text()
    for key in KEYS:
        assert f"`{spelling(key)}`" in readme, spelling(key)
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in quick.splitlines() if line.startswith("make ")]
    assert [c.split()[1] for c in commands] == ["demo", "test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_demo_experiments_are_valid():
    for name in ("demo_train.yaml", "demo_deploy.yaml"):
        raw = yaml.safe_load((ROOT / "experiments" / name).read_text())
        workflow = "train" if "train" in name else "deploy"
        p = validate(raw, workflow=workflow, source=ROOT / "experiments" / name)
        assert p.thumb_data.exists()
