import platform

import pytest

from tests.fakes import Harness
from worker.memory import MALLOC_TRIM, MemoryTrim


def test_freed_memory_is_trimmed_once_an_interval():
    calls: list[int] = []
    trim = MemoryTrim(now=0.0, every_s=60.0, trim=lambda pad: calls.append(pad) or 1)
    for now in (0.0, 30.0, 59.9):
        trim.tick(now)
    assert calls == []
    trim.tick(60.0)
    trim.tick(100.0)
    assert calls == [0]
    trim.tick(120.0)
    assert calls == [0, 0]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_glibc_s_malloc_trim_is_found_and_runs():
    assert MALLOC_TRIM is not None
    assert MALLOC_TRIM(0) in (0, 1)


def test_the_worker_loop_trims_between_steps_not_holding_its_lock():
    h = Harness()
    held: list[bool] = []
    h.worker.memory = MemoryTrim(now=0.0, every_s=0.0, trim=lambda _pad: held.append(h.worker._owner.locked()) or 1)
    h.publish(0, 5)
    h.step(3)
    assert held and not any(held)
