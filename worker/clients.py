"""The seam between the worker and a Kafka client library: plain records and partition events
in, sends and commits out. The worker sees no client library's types; each client
(kafka_python.py today) lives behind these two protocols with its own workarounds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple, Protocol


class TP(NamedTuple):
    """A topic partition."""

    topic: str
    partition: int


class Record(NamedTuple):
    """One consumed record. `unreadable` is set (with the reason) for a record the client could not
    decode: its offset is known, its bytes are not. A named tuple: made for every record, it costs a
    third of a frozen dataclass."""

    tp: TP
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    timestamp_ms: int
    unreadable: str | None = None


@dataclass
class Polled:
    """What one poll returned. Events come first: `revoked` partitions are gone (drop their work),
    `assigned` ones start at their committed offsets. Every record belongs to the current
    assignment and continues its partition where the last poll (or the committed offset) left off."""

    records: list[Record] = field(default_factory=list)
    revoked: set[TP] = field(default_factory=set)
    assigned: set[TP] = field(default_factory=set)


class Refusal(Enum):
    """How a failed send is handled."""

    RETRY = "retry"  # may pass (leader moves, timeouts, a topic missing for a while): again, in order
    REJECTED = "rejected"  # this message can never be accepted (too large for the topic): dead-letter it
    FENCED = "fenced"  # the transactional producer lost its epoch: replace it


class ConsumerClient(Protocol):
    def subscribe(self, topic: str) -> None: ...

    def poll(self, max_records: int, timeout_s: float) -> Polled: ...

    def assignment(self) -> set[TP]: ...

    def pause_all(self, paused: bool) -> None: ...

    def position(self, tp: TP) -> int | None:
        """The next offset this consumer will return (past transaction markers), if known."""

    def commit(self, offsets: dict[TP, int], on_done: Callable[[Exception | None], None] | None = None) -> None:
        """Commit asynchronously, or synchronously (raising) when `on_done` is None."""

    def before_revoke(self, positions: Callable[[set[TP]], dict[TP, int]]) -> None:
        """Register `positions(tps)`: it runs (on any thread) while this member still owns `tps` and is about to
        give them up; what it returns is committed before they go, so acknowledged results are not redone."""

    def group_metadata(self) -> Any: ...

    def rejoin(self) -> None: ...

    def close(self) -> None: ...


class ProducerClient(Protocol):
    def send(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]],
             on_done: Callable[[Exception | None], None]) -> Exception | None:
        """Queue one message; `on_done` runs (on any thread) with None once acknowledged, or the error. A send
        refused at once (no metadata for the topic in time) returns that error too, so the caller stops."""

    def flush(self, timeout_s: float) -> None: ...

    def refusal(self, err: Exception) -> Refusal: ...

    def begin_transaction(self) -> None: ...

    def send_offsets_to_transaction(self, offsets: dict[TP, int], group_metadata: Any) -> None: ...

    def commit_transaction(self) -> None: ...

    def abort_transaction(self) -> None: ...

    def close(self, timeout_s: float) -> None: ...
