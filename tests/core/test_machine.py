"""core/machine.py: the cores this process may use, the machine's memory, and how a run asks
for memory."""

import os
import platform
import subprocess
import sys
from pathlib import Path

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
import ctypes, os, resource, sys
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


def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    batch()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10
with machine.returned_memory():  # a run: its blocks freed below a block still in use
    blocks = [libc.malloc(block) for _ in range(3)]
    for b in blocks:
        ctypes.memset(b, 1, block)
    kept = libc.malloc(1024)
    for b in blocks:
        libc.free(b)
    during = resident()
after = resident()
print(applied, faults, (during - after) // 2**20)
"""
PAGES = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")  # a block's pages


def faults_per_block(mode: str, **env) -> tuple[str, int, int]:
    """In a fresh process (``mode`` keep: after keep_freed_memory): whether it applied, the
    page faults of one batch-sized block after the first, and the MiB a run's end gave back."""
    own = {k: v for k, v in os.environ.items()  # glibc's malloc as it comes (the user's own
           if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}  # settings: a test each)
    r = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                       env={**own, "PYTHONPATH": str(ROOT), **env}, check=True)
    applied, faults, returned = r.stdout.split()
    return applied, int(faults), int(returned)


def huge_pages_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


GLIBC = pytest.mark.skipif(not (sys.platform.startswith("linux")
                                and platform.libc_ver()[0] == "glibc"),
                           reason="glibc's malloc settings: Linux with glibc only")
FAULTING = pytest.mark.skipif(huge_pages_always(), reason="transparent huge pages 'always': a "
                              "block mapped anew takes a few faults, not one a page")


@GLIBC
@FAULTING
def test_freed_blocks_are_kept_for_the_next_batch_not_mapped_anew():
    """Each freed block of a batch's size went back to the system and was mapped again, page
    by page (16,384 faults for 64 MiB of 4 KiB pages); kept, the next batch reuses it."""
    assert faults_per_block("plain")[1] > PAGES // 2
    applied, faults, _ = faults_per_block("keep")
    assert applied == "True" and faults < PAGES // 100


@GLIBC
def test_a_runs_end_gives_the_kept_memory_back():
    """Three freed 64 MiB blocks below one still in use stay with the process while the run
    lasts; after it, a notebook that goes on does not hold them."""
    applied, _, returned = faults_per_block("keep")
    assert applied == "True" and returned >= 150


@GLIBC
@FAULTING
@pytest.mark.parametrize("setting", [{"MALLOC_TRIM_THRESHOLD_": "131072"},
                                     {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}])
def test_the_users_own_malloc_settings_are_left_as_they_are(setting):
    applied, faults, _ = faults_per_block("keep", **setting)
    assert applied == "False" and faults > PAGES // 2


@GLIBC
def test_other_glibc_tunables_do_not_turn_it_off():
    assert faults_per_block("keep", GLIBC_TUNABLES="glibc.pthread.rseq=0")[0] == "True"


def test_a_run_keeps_freed_memory_before_its_first_batch(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(machine, "keep_freed_memory", lambda: calls.append(1))
    exp = write_yaml(tmp_path / "d.yaml", f"thumbData: {tmp_path / 'none.csv'}\n"
                     f"modelAdr: {tmp_path / 'none.pt'}\n")
    r = run_script("deploy_thumbclassifier.py", str(exp))
    assert r.returncode == 2 and calls == [1], r.stderr


def test_a_deploy_says_whether_it_kept_freed_memory(tiny_model, tiny_data, tmp_path):
    import json

    exp = write_yaml(tmp_path / "d.yaml", f"thumbData: {tiny_data}\nmodelAdr: {tiny_model}\n"
                     "bootstrap: 0\ngradcam: 0\nnum_workers: 0\n")
    r = run_script("deploy_thumbclassifier.py", str(exp), "--output", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    timings = json.loads((tmp_path / "d" / "timings.json").read_text())
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert timings["memory_kept"] is (glibc and not machine.user_set_malloc())
