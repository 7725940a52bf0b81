"""The documentation matches the code: the template, the README's quick start, the documentation
site (built strictly, its reference generated from the code), the licence and the citation."""

import argparse
import dataclasses
import importlib.util
import logging
import re
import sys
import types
from html import unescape
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import ROOT, loggers_kept, wait_for

import thumbclf
from thumbclf.cli import command_parser, evaluate_main
from thumbclf.config import KEYS, TRAIN, spelling, template_text, validate


def test_template_lists_every_key_and_is_current():
    text = (ROOT / "experiments" / "template.yaml").read_text()
    assert text == template_text(), ("regenerate: python -m thumbclf.config.render > "
                                     "experiments/template.yaml")
    data = yaml.safe_load(text)
    assert set(data) == {spelling(k) for k in KEYS}
    validate(data, workflow=TRAIN, source=ROOT / "experiments" / "template.yaml")


def test_demo_experiments_are_valid():
    for name in ("demo_train.yaml", "demo_deploy.yaml"):
        raw = yaml.safe_load((ROOT / "experiments" / name).read_text())
        workflow = "train" if "train" in name else "deploy"
        p = validate(raw, workflow=workflow, source=ROOT / "experiments" / name)
        assert p.thumb_data.exists()


def test_readme_is_a_short_front_door_with_the_two_quick_start_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in quick.splitlines() if line.startswith("make ")]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    for name in ("## How to cite", "Hilgers", "Histopathology"):
        assert name in readme, name
    # every subcommand is in its command summary
    summary = readme.split("## Commands", 1)[1].split("\n## ", 1)[0]
    for name in _subcommands():
        assert f"`thumbclf {name}" in summary, name
    # its links into the project resolve (the site is strict; the README must be too)
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    ap = command_parser()
    group = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return dict(group.choices)


def _text(html: str) -> str:
    return unescape(re.sub(r"<[^>]+>", " ", html))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The documentation built strictly (every warning fails), as make docs builds it."""
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python",
                   "mkdocs_gen_files"):
        pytest.importorskip(module, reason=f"{module} is not installed (the docs extra: "
                                           "pip install -e \".[docs]\"; make test installs it)")
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    out = tmp_path_factory.mktemp("site")
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("mkdocs")
    logger.addHandler(handler)
    mp = pytest.MonkeyPatch()
    mp.setenv("DISABLE_MKDOCS_2_WARNING", "true")
    mp.setenv("NO_MKDOCS_2_WARNING", "1")
    mp.chdir(ROOT)
    mp.syspath_prepend(str(ROOT))
    try:
        with loggers_kept():  # the build configures logging
            build(load_config(str(ROOT / "mkdocs.yml"), strict=True, site_dir=str(out)))
    except BaseException as exc:  # mkdocs' Abort, a generator's ShapeError
        pytest.fail(f"the documentation does not build strictly: {exc}\n" + "\n".join(warnings))
    finally:
        logger.removeHandler(handler)
        mp.undo()
    return out


def test_the_site_builds_strictly_and_has_each_kind_of_page(site):
    for page in ("getting-started", "how-to/archives", "how-to/cluster", "how-to/cpu-inference",
                 "how-to/pretraining", "how-to/other-labs", "how-to/review",
                 "concepts/undecided", "concepts/unfamiliar", "concepts/calibration",
                 "concepts/quality-gate", "benchmarks", "changelog", "contributing", "cite"):
        assert (site / f"{page}.html").is_file(), page
    assert not (ROOT / "docs" / "reference").exists()  # generated pages live only in the site
    assert not (site / "gen").exists()  # the generator is not published


def test_the_reference_names_every_key_and_every_subcommand_and_option(site, capsys):
    keys = (site / "reference" / "keys.html").read_text()
    for key in KEYS:
        assert f'id="{key.name}"' in keys, key.name
        section = keys.split(f'id="{key.name}"', 1)[1].split("<h2", 1)[0]
        for name in (key.name, *key.aliases):
            assert f"<code>{name}</code>" in section, (key.name, name)
    # one wording of a default, as the template writes it (issue 31)
    lr = " ".join(_text(keys.split('id="lr"', 1)[1].split("<h2", 1)[0]).split())
    assert "default : 1e-4 (pretrain: 1e-3 )" in lr
    assert "\nlr: 1e-4\n" in (ROOT / "experiments" / "template.yaml").read_text()
    cli = (site / "reference" / "cli.html").read_text()
    for name, sp in _subcommands().items():
        assert f'id="{name}"' in cli, name
        section = _text(cli.split(f'id="{name}"', 1)[1].split("<h2", 1)[0])
        if name == "evaluate":  # parses its own options: read them from its --help
            with pytest.raises(SystemExit):
                evaluate_main(["--help"])
            options = set(re.findall(r"(?<![\w-])--?[a-z][a-z-]*", capsys.readouterr().out))
            assert {"--threshold", "--output"} <= options
            for option in options - {"-h", "--help"}:
                assert option in section, (name, option)
            continue
        for action in sp._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in section, (name, option)


def test_the_reference_has_the_results_folder_the_table_and_the_api(site):
    from thumbclf.core import layout, table

    folder = _text((site / "reference" / "results-folder.html").read_text())
    for value in (layout.CONFIG, layout.RUN_LOG, layout.LOCK, layout.PREDICTIONS, layout.MODEL,
                  "fold_1/model.pt", "timings.json"):
        assert value in folder, value
    columns = _text((site / "reference" / "predictions-table.html").read_text())
    for col in (table.PATH, table.DECISION, table.REASON, table.UNFAMILIARITY,
                *table.SLIDE_COLUMNS):
        assert col in columns, col
    api = _text((site / "reference" / "api.html").read_text())
    for name in thumbclf.__all__:
        if not name.startswith("__"):
            assert f"thumbclf.{name}" in api, name
    assert "return the results folder" in api  # rendered from train's docstring
    layers = _text((site / "reference" / "layers.html").read_text())
    for module in ("thumbclf.cli", "thumbclf.core.layout", "thumbclf.workflows.train"):
        assert module in layers, module


# ---------------------------------------------------------------------------- the generator


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "docs" / "gen" /
                                                  "reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_the_generator_stops_when_the_key_table_changes_shape(gen):
    from thumbclf import config

    assert "## thumbData" in gen.keys_page(config)
    # text from the code is prose: a placeholder such as <decision> shows, outside code spans
    assert gen.prose("into sorted/<decision>/, `sorted/<decision>/`") == (
        "into sorted/&lt;decision&gt;/, `sorted/<decision>/`")
    last = KEYS[-1]
    for change in ({"rule": "colour"}, {"rule": "choice", "choices": ()}, {"doc": ""},
                   {"workflows": ("review",)}):
        fake = SimpleNamespace(ALL=config.ALL, REQUIRED=config.REQUIRED, spelling=config.spelling,
                               KEYS=(*KEYS[:-1], dataclasses.replace(last, **change)))
        with pytest.raises(gen.ShapeError):
            gen.keys_page(fake)
    with pytest.raises(gen.ShapeError, match="holds 0 keys"):
        gen.keys_page(SimpleNamespace(KEYS=(), ALL=config.ALL))


def test_the_generator_stops_on_a_new_name_column_layer_or_a_parser_without_commands(gen, tmp_path):
    from thumbclf.core import layout, table

    planted = types.ModuleType("thumbclf.core.layout")
    planted.__dict__.update({k: v for k, v in vars(layout).items() if not k.startswith("__")})
    planted.__file__ = layout.__file__
    planted.REVIEW = "review.csv"  # a new result file nobody described
    with pytest.raises(gen.ShapeError, match="review.csv"):
        gen.layout_page(planted)
    gone = dict(gen.NAME_MEANINGS, **{"old-results.txt": "a name nothing writes"})
    with pytest.MonkeyPatch().context() as mp:
        mp.setattr(gen, "NAME_MEANINGS", gone)
        with pytest.raises(gen.ShapeError, match="old-results.txt"):
            gen.layout_page(layout)

    def build(*args, **kwargs):  # a table with a column the generator does not know
        df = table.build(*args, **kwargs)
        df["confidence_interval"] = 0.0
        return df

    wider = SimpleNamespace(**{k: getattr(table, k) for k in dir(table) if k.isupper()},
                            InputColumns=table.InputColumns, build=build,
                            __name__="thumbclf.core.table")
    with pytest.raises(gen.ShapeError, match="confidence_interval"):
        gen.table_page(wider)

    contract = (ROOT / "pyproject.toml").read_text()
    assert '"thumbclf.core",' in contract
    pyproject = tmp_path / "pyproject.toml"  # a layer left out of the contract
    pyproject.write_text(contract.replace('"thumbclf.core",', ""))
    assert "`thumbclf.core.layout`" in gen.layers_page(ROOT / "thumbclf", ROOT / "pyproject.toml")
    with pytest.raises(gen.ShapeError, match="no layer.*thumbclf.core.layout"):
        gen.layers_page(ROOT / "thumbclf", pyproject)

    flat = SimpleNamespace(command_parser=lambda: argparse.ArgumentParser(prog="thumbclf"),
                           __name__="thumbclf.cli")
    with pytest.raises(gen.ShapeError, match="no subcommands"):
        gen.cli_page(flat)


# ---------------------------------------------------------------------------- open-source files


def test_licence_and_citation():
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "thumbclf contributors" in licence
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "MIT"
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    from thumbclf.core.version import __version__

    assert cff["version"] == __version__ and cff["license"] == "MIT"
    assert cff["title"].startswith("thumbclf") and cff["authors"] and cff["message"]
    paper = cff["preferred-citation"]
    assert paper["type"] == "article" and paper["journal"] == "Histopathology"
    assert (paper["year"], paper["volume"], paper["issue"], paper["start"], paper["end"]) == (
        2024, 84, 7, 1139, 1153)
    assert paper["authors"][0]["family-names"] == "Hilgers"


# ---------------------------------------------------------------------------- the site from disk


def test_the_built_site_works_from_the_disk_links_open_pages_and_search_finds(site, browser):
    """Issue 31: opened as the README says (site/index.html, file://), every navigation link
    opens a page (not a folder's listing) and the search answers, without a server."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    home = (site / "index.html").as_uri()
    browser.get(home)
    hrefs = browser.execute_script(
        "return [...document.querySelectorAll('a.md-nav__link[href]')].map(a => a.href)")
    pages = sorted({h.split("#", 1)[0] for h in hrefs if h.startswith("file:")})
    assert len(pages) >= 20, pages
    for url in pages:  # each points to a file, as a browser opens it from the disk
        target = Path(url.removeprefix("file://"))
        assert target.suffix == ".html" and target.is_file(), url
    link = browser.find_element(By.CSS_SELECTOR, "a.md-nav__link[href$='getting-started.html']")
    browser.execute_script("arguments[0].click()", link)
    wait_for(lambda: browser.current_url.endswith("getting-started.html"))
    assert "Index of" not in browser.page_source
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("Getting started")
    link = browser.find_element(By.CSS_SELECTOR, "a.md-nav__link[href$='keys.html']")
    browser.execute_script("arguments[0].click()", link)
    wait_for(lambda: browser.current_url.endswith("reference/keys.html"))
    assert browser.find_element(By.ID, "thumb_data")
    nowrap = browser.execute_script(  # a key's name never breaks inside the word
        "return getComputedStyle(document.querySelector('table td:first-child code')).whiteSpace")
    assert nowrap == "nowrap"

    browser.get(home)  # the search: typed into its box, it lists pages
    box = browser.find_element(By.CSS_SELECTOR, "input[data-md-component='search-query']")
    wait_for(lambda: box.is_displayed())
    box.click()
    box.send_keys("freezeRatio")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".md-search-result__item"), 20)
    first = browser.find_element(By.CSS_SELECTOR, ".md-search-result__item a")
    assert ".html" in first.get_attribute("href"), first.get_attribute("href")
    box.send_keys(Keys.ESCAPE)
