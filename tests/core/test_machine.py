"""core/machine.py: the cores this process may use and the machine's memory."""

import os

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
