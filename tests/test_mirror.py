"""tests/ mirrors the package (issue 32): every module with behaviour has its test file,
tests/<layer>/test_<module>.py (tests/test_<module>.py for cli.py and api.py), and no two test
files share a name (the tests folders are not packages)."""

from collections import Counter

from conftest import ROOT

NO_BEHAVIOUR = {"__main__.py", "core/version.py"}
# where a module's name is taken by another layer's test file, its tests live here instead
ELSEWHERE = {
    "config/files.py": "tests/config/test_config.py",  # test_files.py: core/files.py's
    "core/backbones.py": "tests/nn/test_backbones.py",  # the backbones, by name and built
    "evaluate.py": "tests/outputs/test_evaluate.py",  # thumbclf evaluate, start to end
    "workflows/evaluate.py": "tests/outputs/test_evaluate.py",
}


def test_every_module_with_behaviour_has_its_test_file():
    missing = []
    for path in sorted((ROOT / "thumbclf").rglob("*.py")):
        module = path.relative_to(ROOT / "thumbclf").as_posix()
        if path.name == "__init__.py" or module in NO_BEHAVIOUR:
            continue
        layer = path.parent.relative_to(ROOT / "thumbclf")
        expected = ELSEWHERE.get(module, (ROOT / "tests" / layer / f"test_{path.name}")
                                 .relative_to(ROOT).as_posix())
        if not (ROOT / expected).is_file():
            missing.append(f"{module} -> {expected}")
    assert missing == []


def test_test_files_have_unique_names():
    names = Counter(p.name for p in (ROOT / "tests").rglob("test_*.py"))
    assert [n for n, k in names.items() if k > 1] == []
