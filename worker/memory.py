"""Freed heap memory goes back to the OS once a minute. glibc keeps what its per-thread arenas free: with
the forward pass, tokenizer and Kafka client threads running at once, a backlog's catch-up after a
rebalance left ~60 MiB of freed memory resident for good (measured: `malloc_trim` gave it back each
time), so the resident size that memory limits and dashboards read rose by more than live memory did.
A no-op where the C library has no `malloc_trim` (musl, macOS, Windows)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

TRIM_EVERY_S = 60.0


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # a CDLL call releases the GIL while it runs
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


MALLOC_TRIM = _malloc_trim()


class MemoryTrim:
    def __init__(self, now: float, every_s: float = TRIM_EVERY_S,
                 trim: Callable[[int], int] | None = MALLOC_TRIM) -> None:
        self.every_s, self._trim = every_s, trim
        self._next = now + every_s

    def tick(self, now: float) -> None:
        if self._trim is None or now < self._next:
            return
        self._next = now + self.every_s
        self._trim(0)
