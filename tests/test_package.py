"""Packaging: pyproject.toml, requirements.txt and the lock agree; `pip install` of the checkout
gives a working `thumbclf` command that runs from any folder."""

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT, TINY_CLASSES
from thumbclf.inputs import synth

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements(lines) -> dict[str, Requirement]:
    reqs = [Requirement(line.split("#")[0].strip()) for line in lines
            if line.split("#")[0].strip()]
    return {canonicalize_name(r.name): r for r in reqs}


def test_requirements_txt_agrees_with_pyproject():
    project = pyproject()["project"]
    declared = requirements(project["dependencies"] + project["optional-dependencies"]["test"])
    listed = requirements((ROOT / "requirements.txt").read_text().splitlines())
    assert {k: str(v) for k, v in listed.items()} == {k: str(v) for k, v in declared.items()}
    for name, req in declared.items():  # a lower bound on every dependency
        assert any(s.operator in (">=", "==", "~=") for s in req.specifier), name


def test_the_lock_pins_every_requirement_within_its_bounds():
    pins = requirements((ROOT / "constraints.txt").read_text().splitlines())
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "=="
               for r in pins.values())
    extras = [r for reqs in pyproject()["project"]["optional-dependencies"].values() for r in reqs]
    wanted = {**requirements((ROOT / "requirements.txt").read_text().splitlines()),
              **requirements(extras)}  # CI installs the extras with the lock too
    for name, req in wanted.items():
        assert name in pins, f"constraints.txt has no pin for {name}; run make lock"
        version = next(iter(pins[name].specifier)).version
        assert req.specifier.contains(version, prereleases=True), (name, version)
    build = requirements(pyproject()["build-system"]["requires"])
    assert build["setuptools"].specifier.contains(next(iter(pins["setuptools"].specifier)).version)


def test_the_makefile_installs_with_the_lock_and_reinstalls_when_it_changes():
    text = (ROOT / "Makefile").read_text()
    stamp = next(line for line in text.splitlines() if line.startswith("$(VENV)/.installed:"))
    for name in ("requirements.txt", "pyproject.toml", "$(CONSTRAINTS)"):
        assert name in stamp
    assert "CONSTRAINTS ?= constraints.txt" in text and "$(PIN) -r requirements.txt" in text


def _make_rule(text: str, target: str) -> tuple[list[str], list[str]]:
    """A Makefile rule's prerequisites and recipe lines."""
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[i + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return lines[i].split(":", 1)[1].split(), recipe


def test_the_demo_installs_the_runtime_only_and_the_docs_the_docs_extra_only():
    """Issue 31: make demo needs no test tools, make docs no Ray or OpenVINO."""
    text = (ROOT / "Makefile").read_text()
    assert _make_rule(text, "demo")[0] == ["runtime"]
    assert _make_rule(text, "runtime")[0] == ["$(VENV)/.runtime"]
    installs = [r for r in _make_rule(text, "$(VENV)/.runtime")[1] if "pip install" in r]
    assert installs[-1].endswith("$(PIN) -e .") and not any("requirements" in r for r in installs)
    assert _make_rule(text, "docs")[0] == ["$(VENV)/.docs"]
    prereqs, recipe = _make_rule(text, "$(VENV)/.docs")
    assert prereqs == ["$(VENV)/.runtime"]
    assert [r for r in recipe if "pip install" in r] == [
        '$(PY) -m pip install --quiet $(PIN) -e ".[docs]"']


def _fresh_venv(tmp: Path) -> Path:
    """A new virtual environment that sees the running one's packages (torch is not copied)."""
    base = getattr(sys, "_base_executable", sys.executable)
    venv = tmp / "venv"
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True, check=True).stdout
    parents = dict.fromkeys(p for p in [*sys.path, *site.getsitepackages(),
                                        sysconfig.get_paths()["purelib"]]
                            if Path(p).name in ("site-packages", "dist-packages"))
    Path(purelib.strip(), "parent-packages.pth").write_text("\n".join(parents) + "\n")
    return python


@pytest.mark.slow
def test_pip_install_gives_a_thumbclf_command_that_runs_from_any_folder(tmp_path):
    src = tmp_path / "checkout"  # only what the package needs: no tests, no Makefile
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "thumbclf", src / "thumbclf",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    python = _fresh_venv(tmp_path)
    r = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "--no-index", str(src)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    bindir = python.parent
    exe = bindir / ("thumbclf.exe" if os.name == "nt" else "thumbclf")
    assert exe.is_file()

    elsewhere = tmp_path / "elsewhere"  # an unrelated current directory
    elsewhere.mkdir()
    project = tmp_path / "project"
    synth.generate(project / "data", per_class=4, seed=5, sides=(60, 120),
                   classes=TINY_CLASSES)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="2", PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}")

    def thumbclf(*args):
        return subprocess.run(["thumbclf", *args], capture_output=True, text=True,
                              cwd=elsewhere, env=env, timeout=600)

    where = subprocess.run([str(python), "-c", "import thumbclf; print(thumbclf.__file__)"],
                           capture_output=True, text=True, cwd=elsewhere, env=env)
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "venv"), where.stdout + where.stderr
    r = thumbclf("--version")
    assert r.returncode == 0 and r.stdout.startswith("thumbclf "), r.stderr
    assert "init" in thumbclf("--help").stdout

    train_exp, deploy_exp = Path("..", "project", "train.yaml"), Path("..", "project", "deploy.yaml")
    assert thumbclf("init", "--train", str(train_exp)).returncode == 0
    assert thumbclf("init", "--deploy", str(deploy_exp)).returncode == 0
    fast = ["--set", "max_epochs=1", "--set", "pretrained=false", "--set", "foldNumber=2",
            "--set", "gradcam=0", "--set", "bootstrap=0", "--set", "batch_size=8",
            "--set", "num_workers=0", "--quiet"]
    # the starting files' thumbData (data/labels.csv) starts at their folder, not at the cwd
    r = thumbclf("train", str(train_exp), *fast)
    assert r.returncode == 0, r.stderr
    assert (project / "train" / "fold_2" / "model.pt").is_file()  # beside the experiment file
    r = thumbclf("deploy", str(deploy_exp), "--set", "modelAdr=train", "--set", "hasLabels=true",
                 "--set", "thumbData=data/labels.csv", *fast)  # labelled: evaluated below
    assert r.returncode == 0, r.stderr
    assert (project / "deploy" / "predictions.csv").is_file()
    assert (project / "deploy" / "report.html").is_file()
    assert list(elsewhere.iterdir()) == []  # nothing written to the current directory

    r = thumbclf("init", str(train_exp))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {train_exp}: already exists; thumbclf init never overwrites a file. "
        "Choose another name"]
    r = subprocess.run([str(python), "-m", "thumbclf", "evaluate",
                        str(project / "deploy" / "predictions.csv"), "--bootstrap", "0"],
                       capture_output=True, text=True, cwd=elsewhere, env=env)
    assert r.returncode == 0, r.stderr
    assert (project / "deploy" / "evaluation" / "metrics.json").is_file()


def test_the_ray_extra_is_optional_pinned_and_installed_for_the_tests():
    project = pyproject()["project"]
    extra = requirements(project["optional-dependencies"]["ray"])
    assert "ray" in extra and "data" in extra["ray"].extras
    assert "ray" not in requirements(project["dependencies"])  # the default install needs no Ray
    assert "ray" not in requirements((ROOT / "requirements.txt").read_text().splitlines())
    pins = requirements((ROOT / "constraints.txt").read_text().splitlines())
    assert extra["ray"].specifier.contains(next(iter(pins["ray"].specifier)).version)
    for name in ("pyarrow", "msgpack", "protobuf"):  # what ray[data] brings, pinned too
        assert name in pins, name
    text = (ROOT / "Makefile").read_text()  # make test (CI) installs every extra: ray, openvino
    extras = next(line for line in text.splitlines() if line.startswith("EXTRAS :="))
    assert set(extras.split(":=")[1].strip().split(",")) == set(pyproject()["project"]["optional-dependencies"]) - {"test"}
    assert "test: setup $(VENV)/.extras" in text


def test_the_local_path_imports_no_ray():
    code = ("import sys, thumbclf.workflows.deploy, thumbclf.workflows.train, thumbclf.predict.execution, thumbclf.cli;"
            "print('ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_openslide_bin_is_required_from_4_0_1_in_both_lists():
    """Issue 30: openslide-bin 4.0.1 fixes two CVEs, NDPI over 4 GB, GT450 labels and split
    DICOM levels; pyproject.toml and requirements.txt both refuse older wheels."""
    listed = requirements((ROOT / "requirements.txt").read_text().splitlines())
    declared = requirements(pyproject()["project"]["dependencies"])
    for reqs in (listed, declared):
        spec = reqs["openslide-bin"].specifier
        assert "4.0.1" in spec and "4.0.0" not in spec and "4.0.0.99" not in spec
