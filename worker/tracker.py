"""Offsets in flight: per input partition, results leave in offset order and only delivered
offsets become committable.

Every consumed record gets exactly one outgoing message (a result or a dead letter). The
tracker holds each record from poll until the broker acknowledged its message; the commit
position of a partition is the first offset not yet acknowledged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from kafka import TopicPartition


class State(Enum):
    WAITING = 0
    READY = 1
    SENT = 2
    ACKED = 3


@dataclass
class Outgoing:
    """One message to publish on behalf of input record (tp, offset)."""

    tp: TopicPartition
    offset: int
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    timestamp_ms: int
    outcome: str  # the label of a result, or the error code of a dead letter
    is_result: bool


@dataclass
class _Partition:
    entries: OrderedDict[int, list[Any]] = field(default_factory=OrderedDict)  # offset -> [State, Outgoing, size]
    committed: int | None = None  # last position handed out for commit


class OffsetTracker:
    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _Partition] = {}
        self.records = 0
        self.bytes = 0  # input value bytes held, for the worker's memory bound

    def __len__(self) -> int:
        return self.records

    def add(self, tp: TopicPartition, offset: int, size: int = 0) -> None:
        self._parts.setdefault(tp, _Partition()).entries[offset] = [State.WAITING, None, size]
        self.records += 1
        self.bytes += size

    def holds(self, tp: TopicPartition, offset: int) -> bool:
        part = self._parts.get(tp)
        return part is not None and offset in part.entries

    def complete(self, message: Outgoing) -> None:
        entry = self._parts[message.tp].entries[message.offset]
        entry[0], entry[1] = State.READY, message

    def release(self) -> list[Outgoing]:
        """Messages ready to send, each partition's in offset order, stopping at its first unfinished record."""
        out: list[Outgoing] = []
        for part in self._parts.values():
            for entry in part.entries.values():
                if entry[0] is State.WAITING:
                    break
                if entry[0] is State.READY:
                    entry[0] = State.SENT
                    out.append(entry[1])
        return out

    def acked(self, tp: TopicPartition, offset: int) -> None:
        part = self._parts.get(tp)
        if part is not None and offset in part.entries:
            part.entries[offset][0] = State.ACKED

    def acked_all_sent(self) -> None:
        """A committed transaction delivered everything sent in it."""
        for part in self._parts.values():
            for entry in part.entries.values():
                if entry[0] is State.SENT:
                    entry[0] = State.ACKED

    def positions(self) -> dict[TopicPartition, int]:
        """Commit positions that moved since the last call: the first offset whose message is not acknowledged."""
        moved: dict[TopicPartition, int] = {}
        for tp, part in self._parts.items():
            position = None
            while part.entries:
                offset, entry = next(iter(part.entries.items()))
                if entry[0] is not State.ACKED:
                    break
                part.entries.popitem(last=False)
                self.records -= 1
                self.bytes -= entry[2]
                position = offset + 1
            if position is not None and position != part.committed:
                part.committed = position
                moved[tp] = position
        return moved

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            part = self._parts.pop(tp, None)
            if part is not None:
                self.records -= len(part.entries)
                self.bytes -= sum(entry[2] for entry in part.entries.values())
