"""Token-budget batching of the records at hand, after Hugging Face TEI's queue.

Records are sorted by token length and cut greedily into batches that respect both
caps (rows and padded tokens = rows × longest row). A batch goes to the device once
a cap closed it, or once `max_wait` passed since its first record arrived; the oldest
record's batch is served first, so no record (and no partition behind it) starves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

STARVATION_S = 0.25  # longest a partial batch holding the oldest record waits behind full ones


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
    seq: int = 0  # arrival order: breaks ties between records of one poll, keeping offset order

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


def next_batch(pool: Sequence[Pending], caps: BatchCaps, now: float, device_busy: bool = False) -> list[Pending] | None:
    """The batch to run next, or None.

    The batch holding the oldest record goes first once a cap closed it or its wait expired; while
    the device is busy a partial batch waits (records arriving meanwhile can still join) unless its
    oldest record has starved for STARVATION_S. Otherwise any closed batch, oldest first, may go."""
    if not pool:
        return None
    batches = [(min(map(_age, batch)), batch, full) for batch, full in _cut(sorted(pool, key=_length), caps)]
    first, batch, full = min(batches, key=lambda item: item[0])
    waited = now - first[0]
    if full or (waited >= caps.max_wait_s and (not device_busy or waited >= caps.max_wait_s + STARVATION_S)):
        return batch
    closed = [item for item in batches if item[2]]
    return min(closed, key=lambda item: item[0])[1] if closed else None


def _length(p: Pending) -> int:
    return p.length


def _age(p: Pending) -> tuple[float, int]:
    return p.arrived, p.seq


def next_deadline(pool: Sequence[Pending], caps: BatchCaps) -> float | None:
    """When the oldest waiting record's batch must go, at the latest."""
    return min(p.arrived for p in pool) + caps.max_wait_s if pool else None
