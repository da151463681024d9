"""Token-budget batching of the records at hand, after Hugging Face TEI's queue.

Records are sorted by token length and cut greedily into batches that respect both
caps (rows and padded tokens = rows × longest row). A batch goes to the device once
a cap closed it, or once `max_wait` passed since its first record arrived.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BatchCaps:
    max_size: int
    max_tokens: int
    max_wait_s: float


@dataclass
class Pending:
    """A valid record waiting for the device."""

    key: tuple[Any, int]  # (TopicPartition, offset)
    ids: list[int]
    arrived: float
    payload: Any = None

    @property
    def length(self) -> int:
        return len(self.ids)


def padded_tokens(batch: Sequence[Pending]) -> int:
    return len(batch) * max((p.length for p in batch), default=0)


def _cut(ordered: list[Pending], caps: BatchCaps) -> list[tuple[list[Pending], bool]]:
    """Greedy batches over length-sorted records, each with whether a cap closed it."""
    batches: list[tuple[list[Pending], bool]] = []
    current: list[Pending] = []
    for record in ordered:
        rows = len(current) + 1
        if current and (rows > caps.max_size or rows * record.length > caps.max_tokens):
            batches.append((current, True))
            current = []
        current.append(record)
    if current:
        longest = current[-1].length
        full = len(current) >= caps.max_size or (len(current) + 1) * longest > caps.max_tokens
        batches.append((current, full))
    return batches


def next_batch(pool: Sequence[Pending], caps: BatchCaps, now: float, partial_ok: bool = True) -> list[Pending] | None:
    """The batch to run now, or None: among batches closed by a cap (or, when `partial_ok`, whose
    wait expired), the one holding the oldest record."""
    if not pool:
        return None
    ordered = sorted(pool, key=lambda p: p.length)
    ready = []
    for batch, full in _cut(ordered, caps):
        first = min(p.arrived for p in batch)
        if full or (partial_ok and now - first >= caps.max_wait_s):
            ready.append((first, batch))
    return min(ready, key=lambda item: item[0])[1] if ready else None


def next_deadline(pool: Sequence[Pending], caps: BatchCaps) -> float | None:
    """When the oldest waiting record's batch must go, at the latest."""
    return min(p.arrived for p in pool) + caps.max_wait_s if pool else None
