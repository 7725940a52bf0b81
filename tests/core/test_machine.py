"""core/machine.py: the cores this process may use, the machine's memory, and how a run asks
for memory."""

import os
import platform
import subprocess
import sys

import pytest

from conftest import ROOT, run_script, write_yaml
from thumbclf.core import machine


def test_cores_are_the_affinity_and_workers_default_to_one_per_core(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert machine.cores() == 3
    assert machine.workers() == 3 and machine.workers(-1) == 3
    assert machine.workers(0) == 0 and machine.workers(5) == 5


def test_without_an_affinity_the_core_count_is_used(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert machine.cores() == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 12)
    assert machine.cores() == 12


def test_memory_is_the_physical_memory_or_8_gib_when_unknown(monkeypatch):
    assert machine.available_memory() > 0

    def unknown(name):
        raise ValueError(name)

    monkeypatch.setattr(os, "sysconf", unknown)
    assert machine.available_memory() == 8 * 1024**3


FAULTS = """
import ctypes, resource, sys
from thumbclf.core import machine
applied = machine.keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
block = 64 * 2**20  # over glibc's largest automatic threshold (32 MiB): mapped anew each time


def batch():  # a batch's activations (as torch asks for them): allocated, written, freed
    memory = libc.malloc(block)
    ctypes.memset(memory, 1, block)
    libc.free(memory)


batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    batch()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
"""


def faults_per_block(mode: str, **env) -> tuple[str, int]:
    """Page faults of one batch-sized block after the first, in a fresh process (``mode``
    keep: after keep_freed_memory)."""
    r = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **env}, check=True)
    applied, faults = r.stdout.split()
    return applied, int(faults)


GLIBC = pytest.mark.skipif(not (sys.platform.startswith("linux")
                                and platform.libc_ver()[0] == "glibc"),
                           reason="glibc's malloc settings: Linux with glibc only")


@GLIBC
def test_freed_blocks_are_kept_for_the_next_batch_not_mapped_anew():
    """Each freed block of a batch's size went back to the system and was mapped again, page
    by page (16,384 faults for 64 MiB); kept, the next batch reuses it."""
    assert faults_per_block("plain")[1] > 10_000
    applied, faults = faults_per_block("keep")
    assert applied == "True" and faults < 100


@GLIBC
def test_the_users_own_malloc_settings_are_left_as_they_are():
    applied, faults = faults_per_block("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False" and faults > 10_000


def test_a_run_keeps_freed_memory_before_its_first_batch(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(machine, "keep_freed_memory", lambda: calls.append(1))
    exp = write_yaml(tmp_path / "d.yaml", f"thumbData: {tmp_path / 'none.csv'}\n"
                     f"modelAdr: {tmp_path / 'none.pt'}\n")
    r = run_script("deploy_thumbclassifier.py", str(exp))
    assert r.returncode == 2 and calls == [1], r.stderr
