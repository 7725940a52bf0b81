"""Shared fixtures: small generated data sets and helpers to run the scripts as a user would."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thumbclf.inputs import synth

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"
TINY_CLASSES = ("Biopsy", "IHC", "TMA")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """3 classes x 6 small thumbnails with patients; returns labels.csv."""
    out = tmp_path_factory.mktemp("tiny")
    return synth.generate(out, per_class=6, seed=3, sides=(60, 160),
                          classes=TINY_CLASSES, patients=4)


SCRIPTS = {"train_thumbclassifier.py": "train", "deploy_thumbclassifier.py": "deploy",
           "pretrain_thumbclassifier.py": "pretrain"}


# the tests check the pipeline, not a backbone: a MobileNetV3-small from scratch trains in a
# fifth of a ResNet-18's time (issue 32: 5 min 48 s -> 5 min 06 s for the suite); the default
# ResNet-18 is trained by the demo and by the torchrun, familiarity, pip-install and slide
# tests, and every backbone by tests/nn/test_backbones.py
TINY_TRAIN = ("model_name: mobilenet_v3_small\npretrained: false\nbatch_size: 8\nmax_epochs: 1\n"
              "stopEpoch: 0\npatience: 1\nbootstrap: 0\nnum_workers: 0\ngradcam: 0\n")


@pytest.fixture(scope="session")
def tiny_model(tiny_data, tmp_path_factory) -> Path:
    """One tiny trained model (full training, 1 epoch, from scratch), shared by the tests that
    only need *a* model: its results folder, to read and deploy from, never to write into."""
    return train_once(tmp_path_factory.mktemp("model"), "full",
                      f"thumbData: {tiny_data}\ntrainFull: true\n{TINY_TRAIN}")[0]


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: int = 600,
               env_extra: dict | None = None, process: bool = False
               ) -> subprocess.CompletedProcess:
    """Run train_/deploy_/pretrain_thumbclassifier.py as a user would and return what a process
    would: exit code, stdout, stderr. In this process through the command-line function (as
    fast as a test can be), or with ``process`` in a fresh Python process (for what only a
    process shows: its environment at start, signals, a kill)."""
    if process or script not in SCRIPTS:
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2", **(env_extra or {}))
        return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd or ROOT,
                              capture_output=True, text=True, timeout=timeout, env=env)
    return run_cli(SCRIPTS[script], list(args), cwd=cwd, env_extra=env_extra)


def run_cli(workflow: str, argv: list[str], *, cwd: Path | None = None,
            env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``cli.main(workflow, argv)`` in this process, with its own stdout, stderr, working folder
    and environment, all restored afterwards."""
    from thumbclf import cli

    return _in_process(lambda: cli.main(workflow, argv), [workflow, *argv], cwd, env_extra)


def run_command(*args, cwd: Path | None = None,
                env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``thumbclf ARGS`` (``cli.command``) in this process, as ``run_cli`` runs a workflow:
    the command line's exit code, stdout and stderr without a fresh interpreter (issue 32)."""
    from thumbclf import cli

    argv = [str(a) for a in args]
    return _in_process(lambda: cli.command(argv), ["thumbclf", *argv], cwd, env_extra)


def _in_process(call, args: list[str], cwd: Path | None,
                env_extra: dict | None) -> subprocess.CompletedProcess:
    """Run ``call`` (which returns an exit code) with its own stdout, stderr, working folder,
    environment, SIGTERM handler and torch threads, all restored afterwards."""
    import io
    import signal

    import torch

    from thumbclf.core.logs import remove_handlers

    out, err = io.StringIO(), io.StringIO()
    env, here, sigterm = dict(os.environ), os.getcwd(), signal.getsignal(signal.SIGTERM)
    threads = torch.get_num_threads()
    os.environ.update(env_extra or {})
    try:
        os.chdir(cwd or ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = call()
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        remove_handlers()
        os.chdir(here)
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGTERM, sigterm)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def loggers_kept():
    """Put every logger back as it was after a tool that configures logging in this process
    (import-linter's command, an MkDocs build: they disable the loggers that exist, and the tests
    after them read thumbclf's log records)."""
    manager = logging.Logger.manager
    before = {name: (lg.disabled, lg.level, lg.propagate) for name, lg in
              manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        for name, lg in list(manager.loggerDict.items()):
            if isinstance(lg, logging.Logger):
                lg.disabled, lg.level, lg.propagate = before.get(name, (False, lg.level,
                                                                        lg.propagate))
        root.setLevel(level)
        root.handlers[:] = handlers


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def train_once(folder: Path, name: str, text: str) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """Write ``name``.yaml into ``folder``, train with it; return results folder, file, process."""
    exp = write_yaml(folder / f"{name}.yaml", text)
    r = run_script("train_thumbclassifier.py", str(exp))
    assert r.returncode == 0, r.stderr
    return folder / name, exp, r


EVERY_CORE = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
OWN_CORES = set(EVERY_CORE or ())  # this pytest-xdist worker's share (pytest_configure)


def pytest_configure(config):
    """Under pytest-xdist (``make test``: ``-n 2``) each worker computes on its own share of
    the cores, and thumbclf, which takes its thread and worker counts from the cores a process
    may use (core/machine.py), sizes itself to that share, as it would on a smaller machine.
    Otherwise each worker's torch and OpenMP threads took every core, and the workers' threads
    waited on one another: issue 32 measured 384 s against 257 s for the nn, e2e, workflows
    and outputs tests on 2 cores. The Ray tests take every core back (``every_core``)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not (worker and count and EVERY_CORE):
        return
    cpus, n = sorted(EVERY_CORE), int(count)
    i = int(worker.removeprefix("gw"))
    if n > 1 and len(cpus) >= n:
        os.sched_setaffinity(0, cpus[i % n::n])
    elif n > 1:  # more workers than cores: one core each, in turn
        os.sched_setaffinity(0, {cpus[i % len(cpus)]})
    OWN_CORES.clear()
    OWN_CORES.update(os.sched_getaffinity(0))


@contextlib.contextmanager
def on_cores(cores):
    """This process, and the processes it starts meanwhile, on ``cores`` inside the block (None,
    or a system without CPU affinity: unchanged); the worker's share again after it."""
    if cores is None or EVERY_CORE is None:
        yield
        return
    share = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, share)


def every_core():
    """Every core the suite was started with, inside the block (a test of what needs several:
    Ray's decoding tasks beside its inference actor)."""
    return on_cores(EVERY_CORE)


ISOLATED_REPORT = "THUMBCLF_ISOLATED_REPORT"  # the one fresh process writes its outcomes here


# the modules that take longest (their processes: Ray, torchrun, SLURM, fresh interpreters;
# their trainings), longest first, as `--durations=0` measured them on 2 cores (issue 32): `make
# test` keeps this order (--no-loadscope-reorder), so that no worker is left alone with a long
# module at the end while the other has finished; the rest follow in their usual order
LONGEST_FIRST = ("predict/test_ray.py", "nn/test_distributed.py", "nn/test_backbones.py",
                 "e2e/test_processes.py", "test_package.py", "workflows/test_shards.py",
                 "workflows/test_pretrain.py", "e2e/test_e2e.py", "test_api.py",
                 "nn/test_familiarity.py", "workflows/test_deploy.py", "inputs/test_archives.py",
                 "inputs/test_slides.py", "workflows/test_train.py",
                 "outputs/test_review_page.py", "inputs/test_dicomweb.py",
                 "predict/test_verification.py", "predict/test_inference.py",
                 "predict/test_engine_cache.py", "test_docs.py", "nn/test_models.py")


def _rank(item) -> int:
    module = item.nodeid.split("::")[0].removeprefix("tests/")
    return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected
def pytest_collection_modifyitems(config, items):
    """The longest modules first (a stable sort: each module's tests stay together, in their
    order); note the tests marked ``isolated``: they share one fresh process (below)."""
    items.sort(key=_rank)
    config._isolated = [i.nodeid for i in items if i.get_closest_marker("isolated")]
    config._isolated_runs = {}


def pytest_runtest_logreport(report):
    """In the fresh process: each isolated test's outcome, for the process that started it."""
    target = os.environ.get(ISOLATED_REPORT)
    if target and (report.when == "call" or report.outcome != "passed"):
        import json

        with open(target, "a", encoding="utf-8") as f:
            f.write(json.dumps({"id": report.nodeid, "outcome": report.outcome,
                                "text": _text(report.longrepr)}) + "\n")


def _text(longrepr) -> str:
    """A report's reason or traceback as text (a skip's is a (file, line, reason) tuple)."""
    return str(longrepr[2] if isinstance(longrepr, tuple) else longrepr or "")[-4000:]


def _run_isolated(nodeids: list[str]) -> tuple[dict[str, list[dict]], str]:
    """Run ``nodeids`` in one fresh pytest process; their reports by node id, and its output."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "outcomes.jsonl"
        target.touch()
        # one process, not pytest-xdist's workers again, whatever options started this one
        env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "-p", "no:xdist", "-o", "addopts=", *nodeids], cwd=ROOT,
                           capture_output=True, text=True, timeout=900,
                           env=dict(env, THUMBCLF_ISOLATED="1", **{ISOLATED_REPORT: str(target)}))
        outcomes: dict[str, list[dict]] = {}
        for line in target.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            outcomes.setdefault(entry["id"], []).append(entry)
    return outcomes, f"{r.stdout[-4000:]}\n{r.stderr[-2000:]}"


def _batch(config, nodeid: str) -> list[str]:
    """The isolated tests that share a fresh process with ``nodeid``: all of them, or under
    pytest-xdist (``make test``: ``-n 2 --dist loadfile``, a module's tests on one worker) those
    of its module, so that no two workers run the same test."""
    every = getattr(config, "_isolated", None) or [nodeid]
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return every
    module = nodeid.split("::")[0]
    return [n for n in every if n.split("::")[0] == module]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Tests marked ``isolated`` run in a fresh Python process, as a user's run would: OpenVINO
    compiled in a process that has run many torch tests before has crashed it (exit 139).
    Issue 32: all of them share one fresh process (one start instead of one each; under
    pytest-xdist one per module); a test that process did not report on (it crashed first)
    runs again in a process of its own."""
    if pyfuncitem.get_closest_marker("isolated") is None or os.environ.get("THUMBCLF_ISOLATED"):
        return None
    runs = pyfuncitem.config.__dict__.setdefault("_isolated_runs", {})
    batch = tuple(_batch(pyfuncitem.config, pyfuncitem.nodeid))
    if batch not in runs:
        runs[batch] = _run_isolated(list(batch))
    outcomes, output = runs[batch]
    if pyfuncitem.nodeid not in outcomes:
        outcomes, output = _run_isolated([pyfuncitem.nodeid])
    reports = outcomes.get(pyfuncitem.nodeid, [])
    failed = [e for e in reports if e["outcome"] == "failed"]
    if failed or not reports:
        text = "\n".join(e["text"] for e in failed) or output
        pytest.fail(f"in a fresh process:\n{text}", pytrace=False)
    skipped = [e for e in reports if e["outcome"] == "skipped"]
    if skipped:
        pytest.skip(f"in a fresh process: {skipped[0]['text'][-300:]}")
    return True


def make_pyramid(path, w=3000, h=2000, colour=(200, 100, 160), tile=256):
    """A tiled, pyramidal RGB TIFF (generic-tiff for OpenSlide) with a blue mark top-left."""
    import numpy as np
    import tifffile
    from PIL import Image

    base = np.full((h, w, 3), 245, np.uint8)
    base[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = colour
    base[: h // 8, : w // 8] = (0, 0, 255)
    with tifffile.TiffWriter(path) as tw:
        level = base
        while True:
            tw.write(level, tile=(tile, tile), photometric="rgb", compression="zlib",
                     subfiletype=0 if level is base else 1)
            if max(level.shape[:2]) <= 600:
                break
            level = np.asarray(Image.fromarray(level).reduce(2))
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium driven by Selenium; skips, saying why, where either is missing."""
    import shutil

    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("Selenium is not installed (pip install 'thumbclf[test]')")
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Chromium or chromedriver is not installed (as root, make test installs "
                    "them: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    downloads = tmp_path_factory.mktemp("downloads")
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    # Chromium's own temporary folders (org.chromium.Chromium.*) go with the session's, not to
    # /tmp, where each run left three behind
    scratch = tmp_path_factory.mktemp("chromium")
    service = Service(driver, env=dict(os.environ, TMPDIR=str(scratch)))
    b = webdriver.Chrome(service=service, options=options)
    b.downloads = downloads
    yield b
    b.quit()


@pytest.fixture(scope="session")
def model_dir(tiny_model):
    """The session's tiny model, by the name the deploy tests use."""
    return tiny_model


def small_net(seed: int = 0):
    """A ResNet-18's head (512 features -> 3 classes: the last weights of an engine's file) on a
    one-layer body, for the tests of engines, their cache and their gate: what they check does
    not depend on the body, and OpenVINO converts this in a fraction of a ResNet-18's time
    (issue 32)."""
    import torch

    torch.manual_seed(seed)
    body = torch.nn.Sequential(torch.nn.Conv2d(3, 512, 8, stride=8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return torch.nn.Sequential(body, torch.nn.Linear(512, 3)).eval()


# helpers of the tests of hostile inputs (issue 24) and messy archives (issue 5)
def model_file(path, classes=TINY_CLASSES, seed=0):
    """An untrained resnet18 model file for 64-pixel inputs, with ``classes`` (a model file is
    all a deploy needs)."""
    import torch

    from thumbclf.inputs.images import Preprocessing
    from thumbclf.nn import models
    from thumbclf.nn.data import IMAGENET

    torch.manual_seed(seed)
    net = models.build_model("resnet18", len(classes))
    models.save_model(path, models.LoadedModel(net, "resnet18", tuple(classes),
                                               Preprocessing(size=64), IMAGENET, threshold=0.5))
    return path


def deploy(tmp_path, data, model, *extra, name="dep", text=""):
    """``thumbclf deploy`` in this process on ``data`` with ``model``; its exit code."""
    from thumbclf.cli import main

    exp = tmp_path / f"{name}.yaml"
    if not exp.exists():
        exp.write_text(f"thumbData: {data}\nmodelAdr: {model}\nbootstrap: 0\ngradcam: 0\n"
                       f"num_workers: 0\nengine: torch\ncache_dir: {tmp_path / 'cache'}\n{text}")
    return main("deploy", [str(exp), "--quiet", *extra])


# cells a spreadsheet would run as formulas, and labels pandas would read as missing
HOSTILE = ('=HYPERLINK("http://example.org","click")', "+cmd|' /c calc'!A1", "@SUM(A1)",
           "-2+3", "'quoted", "NA", "null")


def odd_names(tmp_path):
    """Two classes of generated thumbnails plus a copy whose name is not UTF-8, as in old
    archives; returns the data folder and that name."""
    import os
    import shutil

    from thumbclf.inputs import synth

    data = tmp_path / "data"
    synth.generate(data, per_class=6, seed=2, sides=(40, 70), classes=("IHC", "TMA"))
    src = next((data / "IHC").glob("*.jpg"))
    odd = os.fsencode(data / "IHC") + b"/\xff\xfe.jpg"  # not UTF-8, as in old archives
    shutil.copy(src, odd)
    return data, os.fsdecode(odd)


def messy_table(tiny_data, tmp_path):
    """The tiny table plus a corrupt, a truncated, an empty, a fake and a missing image."""
    import shutil

    import pandas as pd

    shutil.copytree(tiny_data.parent, tmp_path / "data")
    bad = tmp_path / "data" / "bad"
    bad.mkdir()
    good = next((tmp_path / "data" / "TMA").glob("*.jpg")).read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (bad / "empty.png").write_bytes(b"")
    (bad / "fake.jpg").write_text("not an image")
    (bad / "garbage.png").write_bytes(os.urandom(500))
    df = pd.read_csv(tmp_path / "data" / "labels.csv")
    extra = pd.DataFrame({"PATH": ["bad/truncated.jpg", "bad/empty.png", "bad/fake.jpg",
                                   "bad/garbage.png", "bad/missing.jpg"],
                          "CLASSIFICATION": ["TMA", "IHC", "Biopsy", "TMA", "IHC"],
                          "PATIENT": ["X1", "X2", "X3", "X4", "X5"]})
    pd.concat([df, extra]).to_csv(tmp_path / "data" / "labels.csv", index=False)
    return tmp_path / "data" / "labels.csv"


# the review page, its server and --apply: a results folder made without a model
def results_folder(root: Path, names: list[str], *, classes=TINY_CLASSES, seed=0) -> Path:
    """A deploy results folder: pictures, predictions.csv (3 Undecided, then decided ones, some
    disagreeing with their labels), config.yaml and run.log. No model is needed for the review
    page, its server or --apply."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(seed)
    pictures = root / "slides"
    pictures.mkdir(parents=True)
    rows = []
    for i, name in enumerate(names):
        path = pictures / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(path)
        p = np.sort(rng.dirichlet([1, 1, 1]))[::-1]
        p = np.roll(p, i % 3)
        undecided = i < 3
        rows.append({"PATH": str(path), "CLASSIFICATION": classes[(i + 1) % 3],
                     **dict(zip(classes, p)),
                     "model_prediction": "Undecided" if undecided else classes[int(np.argmax(p))],
                     "undecided_reason": ("unfamiliar" if i == 2 else "low confidence") if undecided else "",
                     "error": "", "threshold": 0.9})
    folder = root / "deploy"
    folder.mkdir()
    pd.DataFrame(rows).to_csv(folder / "predictions.csv", index=False)
    (folder / "config.yaml").write_text("thumb_data: slides\nsort_thumbs: false\n")
    (folder / "run.log").write_text("")
    return folder


@contextlib.contextmanager
def serving(folder):
    """The review server of ``folder`` on 127.0.0.1, in a thread, until the block ends."""
    import threading

    from thumbclf.workflows import review as review_flow

    box: dict = {}
    ready = threading.Event()

    def on_ready(server):
        box["server"] = server
        ready.set()

    thread = threading.Thread(target=review_flow.serve, args=(folder, 0),
                              kwargs={"ready": on_ready}, daemon=True)
    thread.start()
    assert ready.wait(60)
    try:
        yield box["server"]
    finally:
        box["server"].shutdown()
        thread.join(10)


@pytest.fixture
def served(tmp_path):
    """A results folder of four pictures, served; (folder, server)."""
    from thumbclf.core import layout

    folder = results_folder(tmp_path, ["a", "b", "c", "d"])
    with serving(folder) as server:
        yield folder, server
    assert not (folder / layout.LOCK).exists()  # the folder's lock is released


def request(server, method: str, path: str, body: bytes | None = None, headers=None, *,
            token: bool = True):
    """One HTTP request to the review ``server`` (with its token unless ``token`` is false);
    (status, body)."""
    import http.client

    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    sent = {"Host": f"127.0.0.1:{port}", **({"X-Thumbclf-Token": server.token} if token else {})}
    conn.request(method, path, body=body, headers={**sent, **(headers or {})})
    r = conn.getresponse()
    return r.status, r.read()


def wait_for(condition, timeout: float = 10.0):
    """``condition()``'s first true value, polled every 50 ms (the browser tests: a page's
    script, a search result); AssertionError after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")
