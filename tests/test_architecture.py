"""The shape of the package: layers without cycles, every import pointing down (imports inside
functions included), short functions and modules. pyproject.toml's [tool.importlinter] holds
the layers; `lint-imports` checks the same contract by hand."""

from __future__ import annotations

import ast
import shutil
import sys
import tomllib

import pytest

from conftest import ROOT, loggers_kept

grimp = pytest.importorskip("grimp", reason="import-linter (the test extra) is not installed")

PACKAGE = ROOT / "thumbclf"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 450


def layers(root: str = "thumbclf") -> list[list[str]]:
    """The contract's layers, top first, each a list of modules, renamed to ``root``."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = config["contracts"]
    return [[m.strip().replace("thumbclf", root, 1) for m in layer.split("|")]
            for layer in contract["layers"]]


def graph(root: str = "thumbclf"):
    return grimp.build_graph(root, include_external_packages=False,
                             exclude_type_checking_imports=True)


def cycles(g) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan, iteratively)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]
    for start in sorted(g.modules):
        if start in index:
            continue
        work = [(start, iter(sorted(g.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g.find_modules_directly_imported_by(w)))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    group = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        group.append(w)
                        if w == v:
                            break
                    if len(group) > 1:
                        found.append(sorted(group))
    return found


def upward_imports(g, root: str = "thumbclf") -> list[str]:
    """Every import from a layer to one above it, as 'importer -> imported'."""
    rank = {}
    for level, names in enumerate(layers(root)):
        for name in names:
            rank[name] = level

    def level_of(module: str) -> int | None:
        parts = module.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in rank:
                return rank[".".join(parts[:n])]
        return None

    bad = []
    for importer in sorted(g.modules):
        mine = level_of(importer)
        for imported in sorted(g.find_modules_directly_imported_by(importer)):
            theirs = level_of(imported)
            if imported == root and importer != root:
                bad.append(f"{importer} -> {imported} (the package's front door)")
            elif mine is not None and theirs is not None and theirs < mine:
                bad.append(f"{importer} -> {imported}")
    return bad


def test_no_import_cycle_and_every_import_points_down():
    g = graph()
    assert cycles(g) == []
    assert upward_imports(g) == []
    every_module = {p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
                    .removesuffix(".__init__") for p in PACKAGE.rglob("*.py")}
    placed = {m for m in every_module if m.count(".") >= 1}
    top = {name for layer in layers() for name in layer}
    unplaced = sorted(m for m in placed
                      if not any(m == t or m.startswith(t + ".") for t in top))
    assert unplaced == [], "add these modules to a layer in pyproject.toml"


def test_the_import_linter_contract_holds(capsys):
    from importlinter import cli

    with loggers_kept():  # import-linter's command configures logging
        code = cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"))
    assert code == 0, capsys.readouterr().out


def test_a_planted_upward_import_or_cycle_is_caught(tmp_path, monkeypatch):
    """The checks above can fail: a copy of the package with one upward import (core -> api),
    which also closes a cycle, is caught by both."""
    copy = tmp_path / "thumbclf_planted"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for path in copy.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace("thumbclf.", "thumbclf_planted.").replace(
            "from thumbclf import", "from thumbclf_planted import"), encoding="utf-8")
    layout = copy / "core" / "layout.py"
    layout.write_text(layout.read_text() + "\n\ndef _planted():\n    from thumbclf_planted.api "
                      "import train  # an upward import inside a function\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        g = graph("thumbclf_planted")
        assert any("core.layout -> thumbclf_planted.api" in b
                   for b in upward_imports(g, "thumbclf_planted"))
        assert any("thumbclf_planted.core.layout" in group for group in cycles(g))
    finally:
        for name in [m for m in sys.modules if m.startswith("thumbclf_planted")]:
            del sys.modules[name]


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_functions_fit_on_a_screen_and_modules_in_one_sitting():
    long_functions, long_modules = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(ROOT).as_posix()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{name} ({len(text.splitlines())} lines)")
        for fn in _functions(ast.parse(text)):
            lines = fn.end_lineno - fn.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                long_functions.append(f"{name}:{fn.lineno} {fn.name} ({lines} lines)")
    assert long_functions == [], f"split them: at most {MAX_FUNCTION_LINES} lines"
    assert long_modules == [], f"split them: at most {MAX_MODULE_LINES} lines"


MAX_PARAMETERS = 8
RECIPES = "thumbclf/workflows/"  # the recipes read the params and turn them into specs
# Functions below the recipes that still take more than 8 parameters, each with why it is
# allowed for now. Remove an entry when its function takes a spec; a new offender fails.
PARAMETER_ALLOWANCES: set[str] = set()  # none left (issue 32)


def parameter_count(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's parameters, *args and **kwargs included, self and cls not."""
    a = fn.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    return (len(names) - (names[:1] in (["self"], ["cls"])) + (a.vararg is not None)
            + (a.kwarg is not None))


def too_many_parameters(package=PACKAGE) -> list[str]:
    """'path:function (n parameters)' for every function below the recipes over the limit."""
    found = []
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package.parent).as_posix()
        if name.startswith(RECIPES):
            continue
        for fn in _functions(ast.parse(path.read_text(encoding="utf-8"))):
            if parameter_count(fn) > MAX_PARAMETERS:
                found.append(f"{name}:{fn.name} ({parameter_count(fn)} parameters)")
    return found


def test_functions_below_the_recipes_take_at_most_8_parameters():
    """Issue 32: below the recipes, a function takes a few arguments or a small frozen spec
    (ReportSpec, FitSpec), not a dozen loose keywords."""
    over = [f for f in too_many_parameters() if f.split(" (")[0] not in PARAMETER_ALLOWANCES]
    assert over == [], f"at most {MAX_PARAMETERS} parameters: pass a frozen spec"


def test_the_parameter_count_counts_every_kind_of_parameter(tmp_path):
    pkg = tmp_path / "thumbclf"
    (pkg / "workflows").mkdir(parents=True)
    (pkg / "low.py").write_text("def f(a, b, /, c, *d, e, f, g, h, **i): pass\n"
                                "class K:\n    def m(self, a, b, c, d, e, f, g, h): pass\n")
    (pkg / "workflows" / "recipe.py").write_text("def r(a, b, c, d, e, f, g, h, i, j): pass\n")
    assert too_many_parameters(pkg) == ["thumbclf/low.py:f (9 parameters)"]


# Column names written out where core/table.py's constants belong: none left (issue 32); a
# new literal anywhere fails.
COLUMN_ALLOWANCES: set[tuple[str, str]] = set()


def column_names() -> set[str]:
    """The predictions table's column names that mean nothing else. Left out: 'fold',
    'position', 'row', 'threshold' and 'confidence', which are also keys of the experiment
    file, the model file and splits.csv."""
    from thumbclf.core import table

    return {table.PATH, table.LABEL, table.PATIENT, table.SOURCE, table.DECISION, table.ERROR,
            table.ERROR_KIND, table.REASON, *table.SIGNALS, *table.SLIDE_COLUMNS,
            *table.READ_COLUMNS}


def column_literals(package=PACKAGE) -> list[tuple[str, str, int]]:
    """(file, name, line) of each string literal equal to a column name outside
    core/table.py; docstrings are prose and do not count."""
    names, found = column_names(), []
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package.parent).as_posix()
        if name == "thumbclf/core/table.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                           ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        found += [(name, node.value, node.lineno) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and node.value in names and id(node) not in docstrings]
    return sorted(found)


def test_columns_are_named_through_the_tables_constants():
    """Issue 32: a column's name is written once, in core/table.py; everything else uses its
    constant (table.LABEL, not "CLASSIFICATION")."""
    loose = [f"{f}:{line} {name!r}" for f, name, line in column_literals()
             if (f, name) not in COLUMN_ALLOWANCES]
    assert loose == [], "use thumbclf.core.table's constants"


def test_a_column_literal_is_found_but_a_docstring_is_not(tmp_path):
    pkg = tmp_path / "thumbclf"
    pkg.mkdir()
    (pkg / "m.py").write_text('"""PATH"""\n\ndef f(df):\n    """model_prediction"""\n'
                              '    return df["model_prediction"], "path"\n')
    assert column_literals(pkg) == [("thumbclf/m.py", "model_prediction", 5)]


def private_imports(package=PACKAGE) -> list[str]:
    """'path: module._name' for every private name one module imports from another."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("thumbclf"):
                found += [f"{path.relative_to(package.parent).as_posix()}: {node.module}.{a.name}"
                          for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    return found


def test_no_module_imports_a_private_name_of_another(tmp_path):
    """Issue 32: a leading underscore says 'only this module uses it'; an import of one across
    modules made that untrue (the training loop's _prefetch, stream's _timings, ...)."""
    assert private_imports() == []
    planted = tmp_path / "thumbclf"
    planted.mkdir()
    (planted / "a.py").write_text("from thumbclf.b import _helper\n")
    assert private_imports(planted) == ["thumbclf/a.py: thumbclf.b._helper"]


def unsafe_loads(package=PACKAGE) -> list[str]:
    """'path:line' of each torch.load without weights_only=True, and of each pickle load: an
    untrusted model or checkpoint file must never be able to run code."""
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        torches, loads = _torch_names(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) \
                else f.value.attr if isinstance(f, ast.Attribute) and \
                isinstance(f.value, ast.Attribute) else None  # torch.serialization.load
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) \
                else None
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                       and k.value.value is True for k in node.keywords)
            torch_load = (name == "load" and owner in torches | {"serialization"}) or \
                (isinstance(f, ast.Name) and name in loads)
            if (torch_load and not safe) or \
                    (owner in ("pickle", "cloudpickle", "dill") and name in ("load", "loads")):
                found.append(f"{path.relative_to(package.parent).as_posix()}:{node.lineno}")
    return found


def _torch_names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """The names a module binds to torch (``import torch as t``) and to its load function
    (``from torch import load as l``)."""
    torches, loads = {"torch"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            torches |= {a.asname for a in node.names if a.name == "torch" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            loads |= {a.asname or a.name for a in node.names if a.name == "load"}
    return torches, loads


def test_model_files_are_loaded_as_weights_only():
    """A model file or checkpoint from elsewhere is data: torch.load only with
    weights_only=True (nn/models.py refuses pickled code, tests/nn/test_models.py)."""
    assert unsafe_loads() == []


@pytest.mark.parametrize("source, found", [
    ("import pickle, torch\n"
     "a = torch.load('m.pt', weights_only=True)\n"
     "b = torch.load('m.pt', weights_only=False)\n"
     "c = torch.load('m.pt')\n"
     "d = pickle.loads(b'')\n", [3, 4, 5]),
    ("import torch as t\nfrom torch import load as fetch\n"  # under another name
     "import torch.serialization\n"
     "a = t.load('m.pt')\nb = fetch('m.pt')\n"
     "c = torch.serialization.load('m.pt')\n"
     "d = fetch('m.pt', weights_only=True)\n"
     "e = json.load(f)\n", [4, 5, 6])])
def test_an_unsafe_load_is_found(tmp_path, source, found):
    pkg = tmp_path / "thumbclf"
    pkg.mkdir()
    (pkg / "m.py").write_text(source)
    assert unsafe_loads(pkg) == [f"thumbclf/m.py:{n}" for n in found]
