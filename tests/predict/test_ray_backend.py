"""predict/ray_backend.py: a Ray address refused before a driver starts, Ray's log lines kept
off the console, a cluster's token asked for, the CPUs each stage and fold asks for."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import model_file


def test_an_unreachable_ray_address_ends_at_once(tiny_data, tmp_path):
    """In this process (issue 32): the address is refused before any Ray driver starts."""
    pytest.importorskip("ray", reason="Ray is the optional extra thumbclf[ray]")
    from conftest import run_command

    model = model_file(tmp_path / "model.pt")
    exp = tmp_path / "r.yaml"
    exp.write_text(f"thumbData: {tiny_data}\nmodelAdr: {model}\nexecutor: ray\n"
                   "ray_address: localhost:1\nbootstrap: 0\ngradcam: 0\n")
    r = run_command("deploy", exp, "--quiet")
    assert r.returncode == 2, r.stderr
    assert not pytest.importorskip("ray").is_initialized()
    assert "ray_address: cannot reach a Ray cluster at localhost:1 within 10s" in r.stderr


def test_ray_log_lines_on_stderr_go_to_run_log(tmp_path, capfd):
    """Issue 24, hostile inputs."""
    import os

    from thumbclf.core.logs import remove_handlers, setup_logging
    from thumbclf.predict.ray_backend import ray_lines_to_run_log

    setup_logging(tmp_path, quiet=True)
    try:
        with ray_lines_to_run_log():  # as Ray's C++ logger and thumbclf's console write them
            os.write(2, b"[2026-12-02 03:58:07,818 E 11120 11120] core_worker.cc:2465: Actor "
                        b"with class name: 'MapWorker(MapBatches(_Infer))' has constructor ...\n")
            os.write(2, b"a line of thumbclf's own\n")
            os.write(2, b"[2026-12-02 03:58:08,001 F 11120 11120] raylet.cc:1: a fatal one\n")
            os.write(2, b"a last line without its newline")
    finally:
        remove_handlers()
    err = capfd.readouterr().err
    assert err.splitlines() == ["a line of thumbclf's own",
                                "[2026-12-02 03:58:08,001 F 11120 11120] raylet.cc:1: a fatal one",
                                "a last line without its newline"]
    assert "core_worker.cc:2465: Actor with class name" in (tmp_path / "run.log").read_text()


@pytest.mark.parametrize("name", ["StreamingExecutor-x", "iter_threaded"])
def test_ray_is_shut_down_only_after_ray_datas_execution_threads_have_ended(name):
    """A deploy interrupted on a busy machine once ended the whole process (the test worker;
    a notebook's kernel): a Ray Data thread still running after ray.shutdown() read Ray's
    worker ("The core worker has already been shutdown ... The process will exit"). First the
    streaming executor's thread; then, in a full suite, one of the threads that turn blocks
    into batches (``iter_threaded``: it was fetching the next block when the consumer stopped).
    Not the block prefetcher's: it stays parked for the life of the process, and a deploy
    gives it nothing to fetch (prefetch_batches=0)."""
    import threading
    import time

    from thumbclf.predict import ray_backend

    ended = []
    executor = threading.Thread(target=lambda: (time.sleep(0.5), ended.append(1)),
                                name=name, daemon=True)
    other = threading.Thread(target=time.sleep, args=(5,), name="Prefetcher", daemon=True)
    executor.start()
    other.start()
    t = time.monotonic()
    ray_backend.wait_for_data_threads()
    assert ended == [1] and time.monotonic() - t < 4  # Ray Data's working threads, not every


def test_a_cluster_that_asks_for_its_token_says_so_in_one_line(monkeypatch):
    """Ray 2.59 turned token authentication on for clusters started with `ray start`; a
    driver given the address (not 'auto') without RAY_AUTH_MODE=token is refused, and the
    error said only "Failed to connect to Ray cluster at ...", the reason three causes deep.
    The exception is built as Ray 2.60 raises it (seen against a `ray start --head`)."""
    ray = pytest.importorskip("ray", reason="Ray is the optional extra thumbclf[ray]")
    from thumbclf.core.errors import ConfigError
    from thumbclf.predict.executor import ExecutorSpec
    from thumbclf.predict.ray_backend import RayExecutor

    def refused(**kwargs):
        try:
            try:
                raise RuntimeError("ray.exceptions.AuthenticationError: RPC error: "
                                   "InvalidAuthToken: Authentication token is missing or "
                                   "incorrect. Note: RAY_AUTH_MODE is currently 'disabled'")
            except RuntimeError as inner:
                raise RuntimeError("Failed to connect to GCS. Last connection error: "
                                   "Traceback ...") from inner
        except RuntimeError as gcs:
            raise ConnectionError("Failed to connect to Ray cluster at 192.0.2.2:6379") from gcs

    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ConfigError) as err:
        RayExecutor(ExecutorSpec(executor="ray", ray_address="auto", source="e.yaml"))
    message = str(err.value)
    assert "\n" not in message and message.startswith("e.yaml: ray_address: cannot join Ray at auto")
    assert "RAY_AUTH_MODE=token" in message and "~/.ray/auth_token" in message


def test_without_an_address_a_run_starts_its_own_ray_even_beside_a_cluster(monkeypatch):
    """Given no address, Ray joins the cluster a `ray start` left on this machine (its address
    file in /tmp/ray), and refused the CPU count a run's own instance is given: "executor: ray"
    failed on any machine with a cluster running. RAY_ADDRESS, which the docs say is joined,
    met the same refusal. A run without ray_address or RAY_ADDRESS now asks Ray for a local
    instance of its own; with RAY_ADDRESS it joins that cluster, with no CPU count."""
    ray = pytest.importorskip("ray", reason="Ray is the optional extra thumbclf[ray]")
    from thumbclf.core import machine
    from thumbclf.predict import ray_backend
    from thumbclf.predict.executor import ExecutorSpec

    asked = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: asked.append(kwargs))
    monkeypatch.setattr(ray_backend, "unreachable", lambda address: None)
    spec = ExecutorSpec(executor="ray", source="e.yaml")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_backend._join_or_start(ray, spec, False) == ""
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert ray_backend._join_or_start(ray, spec, False) == "10.0.0.5:6379"
    configured = ExecutorSpec(executor="ray", ray_address="auto", source="e.yaml")
    assert ray_backend._join_or_start(ray, configured, False) == "auto"  # the experiment's first
    monkeypatch.setenv("RAY_ADDRESS", "local")  # Ray's word for an instance of its own
    assert ray_backend._join_or_start(ray, spec, False) == ""
    assert [(a["address"], a.get("num_cpus")) for a in asked] == [
        ("local", machine.cores()), ("10.0.0.5:6379", None), ("auto", None),
        ("local", machine.cores())]


def test_each_folds_task_fits_on_a_node():
    """A fold's task asking for more CPUs than any node has waits forever in Ray: cpus_per_fold
    over the largest node is refused, and the fair share is capped at the largest node."""
    from thumbclf.core.errors import ConfigError
    from thumbclf.predict.ray_backend import fold_cpus

    assert fold_cpus(0, [2.0], 2, "e.yaml") == 1          # this machine: as before
    assert fold_cpus(0, [16.0], 3, "e.yaml") == 5
    assert fold_cpus(0, [0.0, 4.0, 4.0, 4.0, 4.0], 2, "e.yaml") == 4  # 8 each would not fit
    assert fold_cpus(3, [4.0, 4.0], 2, "e.yaml") == 3
    assert fold_cpus(0, [8.0], 2, "e.yaml", gpus=True) == 1
    with pytest.raises(ConfigError, match=r"^e\.yaml: cpus_per_fold: 5, but the largest node "
                                          r"of the Ray cluster has 4 CPUs.*at most 4$"):
        fold_cpus(5, [0.0, 4.0, 4.0], 2, "e.yaml")
