"""executor: ray — deployment on Ray Data and cross-validation folds as Ray tasks give the local
path's results; resume, unreadable files and a file that kills its worker. Two runs start a Ray
instance of their own (a one-core deploy, a killed one); the others join one cluster started
for the module (``ray start --head``, 2 CPUs); skipped, with the reason, where Ray is not
installed."""

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import OWN_CORES, ROOT, TINY_TRAIN, every_core, on_cores, run_script, write_yaml
from conftest import make_pyramid

ray = pytest.importorskip("ray", reason='Ray is not installed: pip install "thumbclf[ray]" '
                          "(make test installs it)")
pytestmark = pytest.mark.slow

FAST = TINY_TRAIN.replace("num_workers: 0", "num_workers: 1")  # conftest's, one worker


@pytest.fixture(scope="module", autouse=True)
def all_cores():
    """Ray's pipeline needs a core for its inference actor and one for decoding: this module
    runs on every core, not on its pytest-xdist worker's share (conftest)."""
    with every_core():
        yield


def auth_from_environment():
    """Ray reads RAY_AUTH_MODE and RAY_AUTH_TOKEN once a process: read them again, as Ray's
    own tests do (ray/_private/authentication_test_utils.py; private, so a Ray without it
    reads nothing). A Ray without token authentication (before 2.59) has nothing to read."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError, TypeError):
        return


@pytest.fixture(scope="module")
def head(all_cores, tmp_path_factory):
    """A Ray cluster as a user starts one (``ray start --head``, 2 CPUs, a token of its own
    from Ray 2.59, which ``make test`` installs): its address. The runs that join it spare a
    Ray start each (issue 32: 4-5 s and about 4 CPU-s of Ray's daemons); the runs without an
    address beside it must still start their own (they joined it, and failed, before). Ray's
    files, the note of the current cluster among them, go to a folder of the module's
    (RAY_TMPDIR), not the machine's /tmp/ray, where they would point other users' Ray at this
    cluster; RAY_ADDRESS is unset for the module (a developer's would be joined)."""
    ray_exe = Path(sys.executable).with_name("ray")
    if not ray_exe.is_file():
        pytest.skip(f"no `ray` command beside {sys.executable}")
    with socket.socket() as s:
        s.bind(("", 0))  # Ray's GCS listens on every interface
        port = s.getsockname()[1]
    token = secrets.token_hex(16)  # another local user cannot submit work to it
    ray_tmp = tempfile.mkdtemp(prefix="rt")  # short: Ray's socket paths have a bound
    drivers = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_TMPDIR": ray_tmp}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(drivers, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # stopped at once (else 30 s)
    log = tmp_path_factory.mktemp("head") / "ray-start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(ray_exe), "start", "--head", "--block", f"--port={port}",
                                 "--node-ip-address=127.0.0.1", "--num-cpus=2",
                                 "--include-dashboard=false", "--disable-usage-stats"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    from thumbclf.predict.ray_address import unreachable

    address, deadline = f"127.0.0.1:{port}", time.monotonic() + 120
    try:
        while unreachable(address, timeout=1):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        with pytest.MonkeyPatch.context() as env_of_drivers:
            for name, value in drivers.items():
                env_of_drivers.setenv(name, value)
            env_of_drivers.delenv("RAY_ADDRESS", raising=False)
            auth_from_environment()  # for the drivers in this process too
            yield address
        auth_from_environment()
    finally:
        proc.terminate()  # --block: stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model  # the session's tiny model (conftest)


@pytest.fixture(scope="module")
def archive(tiny_data, tmp_path_factory):
    """The tiny thumbnails, a generated pyramidal slide, a corrupt file and a missing one (issue
    32: its error's kind crosses Ray's batches), in one table."""
    folder = tmp_path_factory.mktemp("archive")
    table = pd.read_csv(tiny_data)
    table["PATH"] = [str((tiny_data.parent / p).resolve()) for p in table["PATH"]]
    slide = make_pyramid(folder / "slide.tiff", w=1600, h=1200)
    (folder / "broken.png").write_bytes(b"not a png")
    extra = pd.DataFrame({"PATH": [str(p) for p in (slide, folder / "broken.png",
                                                    folder / "gone.png")],
                          "CLASSIFICATION": ["IHC", "TMA", "TMA"], "PATIENT": ["s1", "s2", "s3"]})
    out = folder / "labels.csv"
    pd.concat([table, extra], ignore_index=True).to_csv(out, index=False)
    return out


def deploy(exp, *args):  # a process of its own: a Ray driver inside the test process can end it
    return run_script("deploy_thumbclassifier.py", str(exp), *args, process=True, timeout=300)


def deploy_locally(exp, *args):
    """The reference run (executor: local) in this process: no Ray driver, no fresh interpreter
    (issue 32: the suite's time)."""
    return run_script("deploy_thumbclassifier.py", str(exp), *args, "--set", "executor=local")


def same_predictions(a, b):
    """Same rows and order; a column of numbers in either table (blank where a row has none,
    an unreadable file's probabilities) within 1e-5 as numbers ('1.9358e-06' is
    '1.93581e-06'), every other column as the same text (decisions, errors, names)."""
    x, y = pd.read_csv(a, keep_default_na=False), pd.read_csv(b, keep_default_na=False)
    xn, yn = pd.read_csv(a), pd.read_csv(b)  # blanks read as NaN: such columns are floats
    assert list(x.columns) == list(y.columns) and len(x) == len(y)
    for col in x.columns:
        if pd.api.types.is_float_dtype(xn[col]) or pd.api.types.is_float_dtype(yn[col]):
            np.testing.assert_allclose(xn[col].astype(float), yn[col].astype(float), atol=1e-5,
                                       err_msg=col)  # NaN where both are blank
        else:
            assert x[col].tolist() == y[col].tolist(), col


def one_core():
    """The processes started meanwhile may use one core, as in a SLURM job given one CPU: one of
    this worker's own, not the other pytest-xdist worker's, where Ray's workers (nice 15) got
    what that worker's tests left: 95 s instead of 30 s in one run, and more than 300 s with
    three workers on 2 cores (docs/how-to/cluster.md: on a busy machine)."""
    return on_cores({min(OWN_CORES)} if OWN_CORES else None)


def test_ray_deploy_gives_the_local_predictions(model_dir, archive, head, tmp_path):
    """On one core (a SLURM job's one CPU): Ray's model actor and its decoding tasks each asked
    for a whole CPU, and the deploy waited forever for a second one. Without an address, beside
    a running cluster (``head``): a Ray instance of its own, not that cluster."""
    exp = write_yaml(tmp_path / "d.yaml", f"thumbData: {archive}\nmodelAdr: {model_dir}\n"
                     f"{FAST}sortThumbs: true\n")
    r = deploy_locally(exp, "--output", str(tmp_path / "local"))
    assert r.returncode == 0, r.stderr
    with one_core():
        r = deploy(exp, "--output", str(tmp_path / "ray"), "--set", "executor=ray", "--quiet")
    assert r.returncode == 0, r.stderr
    same_predictions(tmp_path / "local" / "predictions.csv", tmp_path / "ray" / "predictions.csv")
    # quiet: none of Ray's own lines (its C++ logger writes each ERROR of the driver to stderr,
    # and Ray Data makes one per inference actor); they are kept in run.log
    ray_line = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+ [TDIWEF] \d+ \d+\]|\(\w*\s*pid=\d+")
    assert [line for line in r.stderr.splitlines() if ray_line.search(line)] == [], r.stderr
    assert r.stdout == ""
    table = pd.read_csv(tmp_path / "ray" / "predictions.csv", keep_default_na=False)
    broken = table[table["PATH"].str.endswith("broken.png")]
    assert len(broken) == 1 and broken["error"].iloc[0] != ""  # reported, not fatal
    kinds = dict(zip(table["PATH"].str.rsplit("/", n=1).str[-1], table["error_kind"]))
    assert (kinds["broken.png"], kinds["gone.png"]) == ("unreadable", "not found")
    slide = table[table["PATH"].str.endswith("slide.tiff")].iloc[0]
    assert slide["error"] == "" and slide["slide_vendor"] == "generic-tiff"
    for name in ("report.html", "metrics.json", "sorted"):
        assert (tmp_path / "ray" / name).exists(), name
    timings = pd.read_json(tmp_path / "ray" / "timings.json", typ="series")
    assert timings["executor"] == "ray" and timings["ray_start_seconds"] > 0
    assert timings["cluster_cpus"] == 1
    assert not (tmp_path / "ray" / "predictions.partial.csv").exists()


def test_an_interrupted_ray_deploy_resumes_without_duplicates_or_gaps(model_dir, archive, head,
                                                                        tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, which thumbclf turns into the same) after the third batch's rows;
    both runs join the module's cluster (ray_address)."""
    from thumbclf import api
    from thumbclf.predict import stream as deployment
    from thumbclf.predict import ray_backend

    settings = (f"thumbData: {archive}\nmodelAdr: {model_dir}\n"
                f"{FAST.replace('batch_size: 8', 'batch_size: 1')}")
    exp = write_yaml(tmp_path / "d.yaml", f"{settings}executor: ray\nray_address: {head}\n")
    ref = deploy_locally(write_yaml(tmp_path / "ref.yaml", settings),
                         "--output", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    appended = []
    original = deployment.append_whole

    def interrupted(path, data):
        original(path, data)
        appended.append(data)
        if len(appended) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(deployment, "append_whole", interrupted)
    monkeypatch.setattr(ray_backend, "DECODE_BATCH", 2)  # rows come back per decoded block
    with pytest.raises(KeyboardInterrupt):
        api.deploy(exp, quiet=True)
    assert not ray.is_initialized()  # the run's Ray driver is shut down
    partial = tmp_path / "d" / "predictions.partial.csv"
    rows = pd.read_csv(partial)["position"]
    assert 3 <= len(rows) < 20 and rows.is_unique
    monkeypatch.setattr(deployment, "append_whole", original)
    api.deploy(exp, quiet=True, resume=True)
    assert "resuming:" in (tmp_path / "d" / "run.log").read_text()
    same_predictions(tmp_path / "ref" / "predictions.csv", tmp_path / "d" / "predictions.csv")


def holders(folder):
    """The processes (pid, command) that hold a file of ``folder`` open."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            fds = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if any(fd.startswith(str(folder)) for fd in fds):
            found.append((proc.name, command))
    return found


def test_a_ray_deploy_killed_with_sigkill_resumes_at_once(model_dir, head, tmp_path):
    """kill -9 of the driver: Ray's processes that it started die with it (kernel fate-sharing),
    but for two agents (dashboard, runtime env), which report the raylet's death to the GCS that
    died with it and wait out Ray's fixed 60 s timeout. They hold nothing of the results
    folder, and a --resume right away (they still run) finishes the run."""
    import signal

    from thumbclf.inputs import synth

    data = synth.generate(tmp_path / "data", per_class=8, seed=5, sides=(40, 70),
                          classes=("Biopsy", "IHC", "TMA"))
    exp = write_yaml(tmp_path / "d.yaml", f"thumbData: {data}\nmodelAdr: {model_dir}\n"
                     f"{FAST.replace('batch_size: 8', 'batch_size: 1')}executor: ray\n")
    ref = deploy_locally(exp, "--output", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    folder = tmp_path / "d"
    partial = folder / "predictions.partial.csv"
    proc = subprocess.Popen([sys.executable, str(ROOT / "deploy_thumbclassifier.py"), str(exp),
                             "--quiet"], env=dict(os.environ, PYTHONPATH=str(ROOT),
                                                  OMP_NUM_THREADS="2"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (partial.is_file() and len(partial.read_bytes().splitlines()) > 1):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (folder / "predictions.csv").exists()  # killed mid-run
    time.sleep(1)  # the processes that share its fate are gone
    assert holders(folder) == []
    r = run_script("deploy_thumbclassifier.py", str(exp), "--resume", "--quiet")  # in here
    assert r.returncode == 0, r.stderr
    assert "resuming:" in (folder / "run.log").read_text()
    same_predictions(tmp_path / "ref" / "predictions.csv", folder / "predictions.csv")


def test_a_file_that_kills_its_worker_is_reported_not_fatal(model_dir, tiny_data, head, tmp_path,
                                                           monkeypatch):
    """A worker set-up hook makes every read of 'killer.png' end the worker process. Its files
    are tried again while the first pipeline's actor still holds its CPU, as Ray may leave it
    until it collects it: a second pipeline's actor took the last CPU, and its decoding tasks
    waited forever (the suite hung once, 12 minutes; 2 CPUs)."""
    import logging
    import signal

    from thumbclf import api
    from thumbclf.predict import ray_backend

    # Ray's own retries of a dead worker's task (2 by default) are Ray's to test; each one
    # is a worker process more to start (issue 32: 42 s alone with them, 24 s without)
    monkeypatch.setattr(ray_backend, "_RETRIES", 0)
    killer = tmp_path / "killer.png"
    killer.write_bytes((tiny_data.parent / pd.read_csv(tiny_data)["PATH"][0]).read_bytes())

    def crash_on_killer():  # before the decoding imports its load_array: no torch for it
        import thumbclf.inputs.decode as decode

        original = decode.load_array

        def load_array(path, *args, **kwargs):
            if str(path).endswith("killer.png"):
                os._exit(1)
            return original(path, *args, **kwargs)

        decode.load_array = load_array

    @ray.remote(num_cpus=1)
    class Holder:
        def ready(self):
            return True

    held = []

    class Linger(logging.Handler):  # between the two passes: one of the 2 CPUs stays taken
        def emit(self, record):
            free = ray.available_resources().get("CPU", 0)  # Ray leaves out a resource at 0
            if "worker died" in record.getMessage() and free >= 2:
                held.append(Holder.remote())  # the first pipeline's actor has gone: stand in
                ray.get(held[-1].ready.remote())

    def waited_forever(*_):
        raise TimeoutError("the files tried again waited for a CPU that never came")

    ray.init(address=head, log_to_driver=False,  # the module's cluster, 2 CPUs
             runtime_env={"worker_process_setup_hook": crash_on_killer,
                          "env_vars": {"PYTHONPATH": str(ROOT)}})
    deadline = time.monotonic() + 60  # the module's cluster: an earlier test's actors gone
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    linger = Linger()
    logging.getLogger(ray_backend.__name__).addHandler(linger)
    alarm = signal.signal(signal.SIGALRM, waited_forever)
    signal.alarm(300)  # the deploy takes 25-45 s; before the fix it waited forever
    try:
        table = pd.read_csv(tiny_data)
        table["PATH"] = [str((tiny_data.parent / p).resolve()) for p in table["PATH"]]
        table.loc[len(table)] = [str(killer), "IHC", "k"]
        table.to_csv(tmp_path / "labels.csv", index=False)
        folder = api.deploy({"thumbData": str(tmp_path / "labels.csv"),
                             "modelAdr": str(model_dir), "executor": "ray", "batch_size": 8,
                             "bootstrap": 0, "gradcam": 0, "num_workers": 1},
                            output=tmp_path / "out", quiet=True)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, alarm)
        logging.getLogger(ray_backend.__name__).removeHandler(linger)
        ray.shutdown()
    result = pd.read_csv(folder / "predictions.csv", keep_default_na=False)
    assert len(result) == len(table)
    row = result[result["PATH"] == str(killer)].iloc[0]
    assert "died once" in row["error"] and row["model_prediction"] == ""
    assert (result["error"] == "").sum() == len(table) - 1  # its batch-mates were predicted
    local = api.deploy({"thumbData": str(tmp_path / "labels.csv"), "modelAdr": str(model_dir),
                        "batch_size": 8, "bootstrap": 0, "gradcam": 0, "num_workers": 0},
                       output=tmp_path / "local", quiet=True)
    same = pd.read_csv(local / "predictions.csv", keep_default_na=False)["PATH"] != str(killer)
    ours = result["PATH"] != str(killer)  # the files tried again are computed as locally
    np.testing.assert_allclose(
        result.loc[ours, ["Biopsy", "IHC", "TMA"]].to_numpy(float),
        pd.read_csv(local / "predictions.csv").loc[same, ["Biopsy", "IHC", "TMA"]].to_numpy(float),
        atol=1e-5)


def test_executor_ray_is_validated(tmp_path):
    exp = write_yaml(tmp_path / "d.yaml", "thumbData: x\nmodelAdr: m.pt\nexecutor: cluster\n"
                     "ray_address: auto\n")
    r = deploy(exp)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {exp}: executor must be one of local, ray; got 'cluster'",
        f"error: {exp}: ray_address is only used with executor: ray; add executor: ray or "
        "remove ray_address"]


def test_ray_cross_validation_gives_the_local_predictions(tiny_data, head, tmp_path,
                                                         monkeypatch):
    """The folds as Ray tasks on the cluster of RAY_ADDRESS (the module's), and a resumed run
    that gives Ray only the unfinished one."""
    exp = write_yaml(tmp_path / "cv.yaml", f"thumbData: {tiny_data}\nfoldNumber: 2\n{FAST}"
                     "cpus_per_fold: 1\n")
    r = run_script("train_thumbclassifier.py", str(exp), "--output", str(tmp_path / "local"))
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv("RAY_ADDRESS", head)
    r = run_script("train_thumbclassifier.py", str(exp), "--output", str(tmp_path / "ray"),
                   "--set", "executor=ray")
    assert r.returncode == 0, r.stderr
    for name in ("splits.csv", "predictions.csv", "fold_1/predictions.csv",
                 "fold_2/predictions.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "local" / name),
                                      pd.read_csv(tmp_path / "ray" / name), obj=name)
    log = (tmp_path / "ray" / "run.log").read_text()
    assert "folds as Ray tasks" in log and "[fold 2, pid" in log
    assert f"Ray: {head}, 2 CPUs" in log  # joined, not started
    # finished folds are skipped on --resume, the rest trained as Ray tasks: remove fold 2's
    (tmp_path / "ray" / "fold_2" / "predictions.csv").unlink()
    r = run_script("train_thumbclassifier.py", str(exp), "--output", str(tmp_path / "ray"),
                   "--set", "executor=ray", "--resume")
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "ray" / "run.log").read_text()
    assert "fold_1: finished earlier; skipped" in log
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "local" / "predictions.csv"),
                                  pd.read_csv(tmp_path / "ray" / "predictions.csv"))
