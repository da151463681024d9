"""Records in hand, from poll to commit: every consumed record gets exactly one outgoing message
(a result or a dead letter), messages leave in each input partition's offset order, and a
partition's commit position is its first record whose message is not yet acknowledged.

Each assignment of a partition opens a new epoch; work computed under another epoch (a batch
that was on the device while its partition moved away and came back) is dropped, never sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from worker.clients import TP, Record, Refusal


class State(Enum):
    WAITING = 0  # on its way through the model
    READY = 1  # message built, not sent
    SENT = 2  # handed to the producer (under exactly-once: in the open transaction)
    ACKED = 3  # acknowledged by the broker (under exactly-once: its transaction committed)


@dataclass
class Outgoing:
    """One message to publish on behalf of an input record."""

    record: Record
    topic: str
    value: bytes
    outcome: str  # the label of a result, or the error code of a dead letter
    is_result: bool
    keep_headers: bool = True  # the input record's headers travel with it


@dataclass(slots=True)
class Entry:
    record: Record
    epoch: int
    state: State = State.WAITING
    message: Outgoing | None = None
    attempt: int = 0  # sends so far: an answer to an older attempt is ignored
    refusal: Refusal | None = None
    detail: str = ""


COMPACT_AFTER = 4096  # let-go entries kept at the front of a partition's list before it is cut


@dataclass(slots=True)
class _Partition:
    """Entries in offset order in `entries[base:]` (the ones before `base` were let go). Two cursors make each
    step's work proportional to what changed, not to what is in hand: every entry before `sent_to` is SENT or
    ACKED, every entry before `acked_to` is ACKED. They only move forward, except when a failure sends entries
    again (then they move back to the first of those)."""

    epoch: int
    entries: list[Entry] = field(default_factory=list)
    by_offset: dict[int, Entry] = field(default_factory=dict)
    base: int = 0
    sent_to: int = 0
    acked_to: int = 0
    done_to: int | None = None  # every record below was delivered and let go
    committed: int | None = None  # last position handed to a commit that has not failed
    in_flight: int = 0  # entries SENT and not yet answered
    failed: bool = False  # an answer of the current round was an error
    retry_at: float = 0.0

    def advance(self) -> None:
        entries, i = self.entries, self.acked_to
        while i < len(entries) and entries[i].state is State.ACKED:
            i += 1
        self.acked_to = i
        i = max(i, self.sent_to)
        while i < len(entries) and entries[i].state in (State.SENT, State.ACKED):
            i += 1
        self.sent_to = i

    def rewind(self, index: int) -> None:
        """Entries from `index` on may be READY again."""
        self.sent_to = min(self.sent_to, index)
        self.acked_to = min(self.acked_to, index)

    def in_transit(self) -> list[Entry]:
        """Entries that may be SENT: between the cursors."""
        self.advance()
        return [e for e in self.entries[self.acked_to:self.sent_to] if e.state is State.SENT]


class OffsetTracker:
    def __init__(self) -> None:
        self._parts: dict[TP, _Partition] = {}
        self._epochs = 0
        self.records = 0
        self.bytes = 0  # input value bytes held, for the worker's memory bound

    def __len__(self) -> int:
        return self.records

    # -- partitions ---------------------------------------------------------------------------------

    def open(self, tp: TP) -> int:
        """A (re)assignment: forget what was in hand and start a new epoch."""
        self.close(tp)
        self._epochs += 1
        self._parts[tp] = _Partition(self._epochs)
        return self._epochs

    def close(self, tp: TP) -> None:
        part = self._parts.pop(tp, None)
        if part is not None:
            self.records -= len(part.by_offset)
            self.bytes -= sum(len(e.record.value or b"") for e in part.by_offset.values())

    def partitions(self) -> set[TP]:
        return set(self._parts)

    def epoch(self, tp: TP) -> int | None:
        part = self._parts.get(tp)
        return part.epoch if part else None

    # -- records ------------------------------------------------------------------------------------

    def add(self, record: Record) -> int | None:
        """Hold a consumed record; returns its partition's epoch, None when the partition is not open here. An
        offset already in hand (a client that fetched it twice) keeps its first entry: one message per offset,
        and the cursors stay true."""
        part = self._parts.get(record.tp)
        if part is None:
            return None
        if record.offset not in part.by_offset:
            entry = Entry(record, part.epoch)
            part.entries.append(entry)
            part.by_offset[record.offset] = entry
            self.records += 1
            self.bytes += len(record.value or b"")
        return part.epoch

    def entry(self, tp: TP, epoch: int, offset: int) -> Entry | None:
        """The entry of `offset` if it is still in hand under `epoch`."""
        part = self._parts.get(tp)
        if part is None or part.epoch != epoch:
            return None
        return part.by_offset.get(offset)

    def complete(self, tp: TP, epoch: int, offset: int, message: Outgoing) -> bool:
        entry = self.entry(tp, epoch, offset)
        if entry is None or entry.state is not State.WAITING:
            return False
        entry.state, entry.message = State.READY, message
        return True

    def release(self, now: float, one_round: bool) -> list[Entry]:
        """Entries to send now, each partition's in offset order, stopping at its first unfinished record.
        `one_round` (at-least-once): a partition sends its next round only once every message of the last
        one was answered, so that a failure is known before anything after it goes out."""
        out: list[Entry] = []
        for part in self._parts.values():
            if one_round and (part.in_flight or part.failed or part.retry_at > now):
                continue
            part.advance()
            entries, i = part.entries, part.sent_to
            while i < len(entries):
                entry = entries[i]
                if entry.state is State.WAITING:
                    break
                if entry.state is State.READY:
                    entry.state = State.SENT
                    entry.attempt += 1
                    entry.refusal = None
                    part.in_flight += 1
                    out.append(entry)
                i += 1
            part.sent_to = i
        return out

    def answered(self, tp: TP, epoch: int, offset: int, attempt: int, refusal: Refusal | None,
                 detail: str) -> Entry | None:
        """The broker's answer to one send: its entry, or None when it no longer matters (stale epoch or attempt)."""
        part = self._parts.get(tp)
        entry = part.by_offset.get(offset) if part is not None and part.epoch == epoch else None
        if entry is None or entry.attempt != attempt or entry.state is not State.SENT:
            return None
        part.in_flight -= 1
        if refusal is None:
            entry.state = State.ACKED
        else:
            entry.refusal, entry.detail = refusal, detail
            part.failed = True
        return entry

    def fail_sent(self, refusal: Refusal, detail: str) -> None:
        """Every send not yet answered counts as refused (at-least-once: its producer was replaced), so that
        its round ends, failed, and goes out again."""
        for part in self._parts.values():
            for entry in part.in_transit():
                if entry.refusal is None:
                    entry.refusal, entry.detail = refusal, detail
                    part.in_flight -= 1
                    part.failed = True

    def failed_rounds(self) -> list[tuple[TP, list[Entry]]]:
        """Partitions whose last round is fully answered with a failure in it, each with the entries to
        send again: from the first failed one on, in order (acknowledged ones too, so that the output
        ends in offset order; at-least-once allows the repeat). They are READY again."""
        out = []
        for tp, part in self._parts.items():
            if not part.failed or part.in_flight:
                continue
            part.failed = False
            part.advance()
            again: list[Entry] = []
            first = None
            for i in range(part.acked_to, len(part.entries)):
                entry = part.entries[i]
                if entry.state is State.WAITING or entry.state is State.READY:
                    break
                if again or entry.refusal is not None:
                    first = i if first is None else first
                    again.append(entry)
            for entry in again:
                entry.state = State.READY
            if first is not None:
                part.rewind(first)
            out.append((tp, again))
        return out

    def hold(self, tp: TP, until: float) -> None:
        part = self._parts.get(tp)
        if part is not None:
            part.retry_at = until

    def sent(self) -> list[Entry]:
        """Entries sent and not yet acknowledged (under exactly-once: the open transaction's)."""
        return [e for part in self._parts.values() for e in part.in_transit()]

    def ready(self) -> bool:
        for part in self._parts.values():
            part.advance()
            if any(e.state is State.READY for e in part.entries[part.sent_to:]):
                return True
        return False

    def transaction_committed(self) -> None:
        """Everything sent in the committed transaction is delivered."""
        for part in self._parts.values():
            part.in_flight = 0
            for entry in part.in_transit():
                entry.state = State.ACKED

    def transaction_aborted(self) -> None:
        """Nothing of the aborted transaction is visible: what it held goes out again, in order."""
        for part in self._parts.values():
            part.in_flight, part.failed = 0, False
            for entry in part.in_transit():
                entry.state = State.READY
            part.rewind(part.acked_to)

    # -- commits ------------------------------------------------------------------------------------

    def commit_positions(self, include_sent: bool = False,
                         position: Callable[[TP], int | None] | None = None) -> dict[TP, int]:
        """Positions that moved past the last commit: each partition's first record whose message is not
        acknowledged (`include_sent`: not yet in the transaction about to commit). A partition with
        nothing else in hand may move to the consumer's `position`, which lies past transaction
        markers, so that a caught-up worker shows no lag on transactional input."""
        moved: dict[TP, int] = {}
        for tp, part in self._parts.items():
            part.advance()
            upto = part.sent_to if include_sent else part.acked_to
            target = part.entries[upto - 1].record.offset + 1 if upto > part.base else part.done_to
            if upto == len(part.entries) and position is not None:
                now = position(tp)
                if now is not None and (target is None or now > target):
                    target = now
            if target is not None and (part.committed is None or target > part.committed):
                moved[tp] = target
        return moved

    def committing(self, offsets: dict[TP, int]) -> None:
        """These positions were handed to a commit: let go of the records below them."""
        for tp, position in offsets.items():
            part = self._parts.get(tp)
            if part is None:
                continue
            part.committed = position
            part.done_to = max(part.done_to or 0, position)
            entries, i = part.entries, part.base
            while i < len(entries) and entries[i].record.offset < position:
                entry = entries[i]
                entries[i] = None  # type: ignore[call-overload] - let go; never read again (i < base)
                del part.by_offset[entry.record.offset]
                self.records -= 1
                self.bytes -= len(entry.record.value or b"")
                i += 1
            part.base = i
            part.sent_to, part.acked_to = max(part.sent_to, i), max(part.acked_to, i)
            if part.base >= COMPACT_AFTER:
                del entries[:part.base]
                part.sent_to -= part.base
                part.acked_to -= part.base
                part.base = 0

    def commit_failed(self, offsets: dict[TP, int]) -> None:
        """A commit did not go through: offer those positions again next time."""
        for tp, position in offsets.items():
            part = self._parts.get(tp)
            if part is not None and part.committed == position:
                part.committed = None
