"""The ledger parallel stages book cores and memory in (edgebuild/pipeline/machine.py)."""
import json
import multiprocessing
import os
import time

import pytest

from edgebuild.pipeline import machine


def hold(path, task, memory, seconds, started):
    ledger = machine.Ledger(path)
    with ledger.admitted(task, memory):
        started.put((task, time.monotonic()))
        time.sleep(seconds)
    started.put((f"{task} left", time.monotonic()))


def test_a_stage_waits_until_its_memory_fits_beside_the_running_ones(tmp_path):
    path = tmp_path / "ledger.json"
    machine.Ledger.create(path, cores=4, memory=10)
    events = multiprocessing.get_context("fork").Queue()
    first = multiprocessing.get_context("fork").Process(target=hold, args=(path, "search", 7, 1.0, events))
    first.start()
    assert events.get(timeout=10)[0] == "search"
    second = multiprocessing.get_context("fork").Process(target=hold, args=(path, "evaluate", 7, 0.0, events))
    second.start()
    order = [events.get(timeout=10)[0] for _ in range(3)]
    first.join()
    second.join()
    # 7 + 7 > 10: the second stage started only after the first had left.
    assert order == ["search left", "evaluate", "evaluate left"]


def test_stages_that_fit_run_together(tmp_path):
    path = tmp_path / "ledger.json"
    machine.Ledger.create(path, cores=2, memory=10)
    events = multiprocessing.get_context("fork").Queue()
    processes = [multiprocessing.get_context("fork").Process(target=hold, args=(path, name, 4, 1.0, events))
                 for name in ("a", "b")]
    for process in processes:
        process.start()
    order = [events.get(timeout=10)[0] for _ in range(4)]
    for process in processes:
        process.join()
    assert sorted(order[:2]) == ["a", "b"]  # both in before either left


def test_a_stage_alone_always_starts_even_above_the_memory(tmp_path):
    path = tmp_path / "ledger.json"
    machine.Ledger.create(path, cores=1, memory=1)
    with machine.Ledger(path).admitted("export", 10**12):
        assert json.loads(path.read_text())["stages"][str(os.getpid())]["task"] == "export"
    assert json.loads(path.read_text())["stages"] == {}


def test_the_entry_of_a_killed_stage_is_dropped(tmp_path):
    path = tmp_path / "ledger.json"
    machine.Ledger.create(path, cores=2, memory=10)
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(0,))
    child.start()
    child.join()  # a pid that no longer exists
    state = json.loads(path.read_text())
    state["stages"][str(child.pid)] = {"task": "evaluate", "memory": 10, "cores": 2}
    path.write_text(json.dumps(state))
    with machine.Ledger(path).admitted("compress", 5):  # would wait forever if the entry counted
        assert list(json.loads(path.read_text())["stages"]) == [str(os.getpid())]


def test_cores_are_a_stages_own_plus_the_free_ones(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    machine.Ledger.create(path, cores=3, memory=100)
    monkeypatch.setenv(machine.LEDGER_VARIABLE, str(path))
    ledger = machine.Ledger(path)
    with ledger.admitted("evaluate", 1):
        with machine.cores(8) as granted:
            assert granted == 3
            with machine.cores(8) as nested:  # everything is held: only the stage's own core
                assert nested == 1
        with machine.cores(2) as granted:
            assert granted == 2
        assert json.loads(path.read_text())["stages"][str(os.getpid())]["cores"] == 1


def test_without_a_ledger_every_core_asked_for_is_given(monkeypatch):
    monkeypatch.delenv(machine.LEDGER_VARIABLE, raising=False)
    with machine.cores(6) as granted:
        assert granted == 6


@pytest.mark.parametrize("memory, model, expected", [
    (None, 10 << 20, 4),                                       # unknown memory: one stage per core
    (64 << 30, 10 << 20, 4),                                   # cores bound it
    (machine.stage_memory(2 << 30) * 2 + 1, 2 << 30, 2),       # memory bounds it
    (1, 10 << 20, 1),                                          # not even one fits: one at a time
])
def test_parallel_stages_are_bounded_by_cores_and_memory(monkeypatch, memory, model, expected):
    monkeypatch.setattr(machine, "memory_for_stages", lambda: memory)
    assert machine.parallel_stages(4, model) == expected


def test_edgebuild_memory_overrides_what_the_kernel_says(monkeypatch):
    monkeypatch.setenv(machine.MEMORY_VARIABLE, "12345")
    assert machine.memory_for_stages() == 12345
