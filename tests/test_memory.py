import platform

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


def test_glibc_s_malloc_trim_is_found_and_runs():
    if platform.libc_ver()[0] != "glibc":
        assert MALLOC_TRIM is None or callable(MALLOC_TRIM)
        return
    assert MALLOC_TRIM is not None
    assert MALLOC_TRIM(0) in (0, 1)

