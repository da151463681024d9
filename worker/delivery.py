"""Delivery guarantees: what is sent, when offsets commit, and what a refused send becomes.

Both guarantees have one interface, `publish()` (send what the tracker has ready), `step()`
(take in the broker's answers; commit every `commit_interval_s`), `abandon()` (partitions
were revoked), `flush()` (the end of a drain) and `close()`:

- `AtLeastOnce` sends asynchronously, one round per partition at a time, and commits a
  partition's offsets only up to its first message the broker has not acknowledged (acks=all).
- `ExactlyOnce` wraps the messages and the consumed offsets in one Kafka transaction per
  interval (the consume-transform-produce loop of confluent-kafka's eos_transactions example).

A refused send is classified by the client: RETRY (may pass: sent again, in partition order,
with backoff, for as long as it takes; `refusing_since` turns /readyz to 503 after a while),
REJECTED (can never pass: the input record becomes an `output_rejected` dead letter) or
FENCED (exactly-once: replace the producer, or stop when another live instance owns the id).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from time import monotonic as clock  # one name, so a test can run this on its own clock

from contract.cli import UserError
from contract.records import DeadLetterCode, Rejection, Source, copy_headers, encode_dead_letter
from worker.clients import TP, ConsumerClient, ProducerClient, Refusal
from worker.tracker import Entry, OffsetTracker, Outgoing

log = logging.getLogger(__name__)

OnDelivered = Callable[[Outgoing], None]
Answer = tuple[tuple[TP, int, int, int, int], Exception | None]  # (tp, epoch, offset, attempt, producer), error
RECORD_OVERHEAD = 100  # bytes a one-record batch adds around key, value and headers (at most ~90)
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
UNANSWERED_LIMIT_S = 30.0  # past the clients' delivery timeout (20 s), within which every send is answered: a
#                            producer that answers none of its pending sends this long is stuck (seen: kafka-python's
#                            idempotent producer waiting for a producer id after a broker restart)


class Interrupted(BaseException):
    """A second signal ended the drain: nothing more is committed (no `except Exception` stops it)."""


def rejected_dead_letter(entry: Entry, dlq_topic: str) -> Outgoing:
    """What a message its topic refuses for good becomes: a result, an `output_rejected` dead letter; a dead
    letter the dead-letter topic refuses, a minimal one (no value bytes, no headers), so nothing loops."""
    record = entry.record
    source = Source(record.tp.topic, record.tp.partition, record.offset)
    if entry.message.topic == dlq_topic:
        rejection = Rejection(DeadLetterCode.OUTPUT_REJECTED, f"{dlq_topic} refuses the full dead letter "
                                                              f"({entry.message.outcome}): {entry.detail}")
        return Outgoing(record, dlq_topic, encode_dead_letter(rejection, record.value, source, keep_bytes=0),
                        DeadLetterCode.OUTPUT_REJECTED.value, is_result=False, keep_headers=False)
    rejection = Rejection(DeadLetterCode.OUTPUT_REJECTED, f"{entry.message.topic} refuses the result: {entry.detail}")
    return Outgoing(record, dlq_topic, encode_dead_letter(rejection, record.value, source),
                    DeadLetterCode.OUTPUT_REJECTED.value, is_result=False)


class _Delivery:
    """What both guarantees share: sending with answers queued for the main thread, backoff, renewal."""

    one_round = False

    def __init__(self, make_producer: Callable[[], ProducerClient], consumer: ConsumerClient, tracker: OffsetTracker,
                 dlq_topic: str, on_delivered: OnDelivered, on_error: Callable[[], None],
                 commit_interval_s: float,
                 max_message_bytes: Callable[[str], int | None] = lambda _topic: None) -> None:
        self.make_producer = make_producer
        self.max_message_bytes = max_message_bytes
        self.producer: ProducerClient | None = make_producer()
        self._classify = self.producer.refusal
        self.consumer, self.tracker, self.dlq_topic = consumer, tracker, dlq_topic
        self.on_delivered, self.on_error = on_delivered, on_error
        self.commit_interval_s = commit_interval_s
        self.refusing_since: float | None = None  # first refusal of an outage still going on
        self._answers: queue.SimpleQueue[Answer] = queue.SimpleQueue()
        self._backoff = BACKOFF_MIN_S
        self._resume_at = 0.0
        self._last_commit = clock()
        self.interrupted: Callable[[], bool] = lambda: False  # set by the loop: a second signal came
        self._generation = 0  # of the producer: answers from a replaced one do not count as this one's
        self._unanswered = 0  # sends of the current producer without an answer yet
        self._answered_at = clock()  # the current producer's last answer, or its first send after none pending

    def publish(self) -> None:
        now = clock()
        if now < self._resume_at or not self._producer_ready():
            return
        entries = self.tracker.release(now, self.one_round)
        if entries:
            self._before_send()
            if not self._unanswered:
                self._answered_at = now
        self._unanswered += len(entries)
        answer, send, generation = self._answers.put, self.producer.send, self._generation
        refused_at_once: Exception | None = None
        for entry in entries:
            self._fit(entry)
            message, record = entry.message, entry.record
            key = (record.tp, entry.epoch, record.offset, entry.attempt, generation)
            if refused_at_once is not None:  # e.g. no metadata for the topic: the rest of the round waits no more
                answer((key, refused_at_once))
                continue
            headers = copy_headers(record.headers) if message.keep_headers else []
            refused_at_once = send(message.topic, record.key, message.value, headers,
                                   lambda err, k=key: answer((k, err)))

    def _fit(self, entry: Entry) -> None:
        """A message over its topic's max.message.bytes can never be accepted: dead-letter it now."""
        message, record = entry.message, entry.record
        limit = self.max_message_bytes(message.topic)
        if limit is None or not message.keep_headers:
            return
        size = len(message.value) + len(record.key or b"") + RECORD_OVERHEAD
        if record.headers:
            size += sum(len(k) + len(v or b"") for k, v in record.headers)
        if size > limit:
            entry.detail = f"{size} bytes with its key and headers, over max.message.bytes={limit}"
            entry.message = rejected_dead_letter(entry, self.dlq_topic)

    def _before_send(self) -> None:
        """Exactly-once opens its transaction here."""

    def before_revoke(self, partitions: set[TP]) -> dict[TP, int]:
        """Positions to commit before `partitions` are given up: none by default (exactly-once commits only
        inside its transactions, and a revoke aborts the open one)."""
        return {}

    def _refused(self, err: Exception) -> Refusal:
        self.on_error()
        refusal = self._classify(err)
        if refusal is Refusal.RETRY and self.refusing_since is None:
            self.refusing_since = clock()
            log.warning("publishing fails (%s: %s); retrying with backoff, not committing", type(err).__name__, err)
        return refusal

    def _back_off(self) -> float:
        """Another failed round: wait longer."""
        until = clock() + self._backoff
        self._backoff = min(BACKOFF_MAX_S, self._backoff * 2)
        return until

    def _recovered(self) -> None:
        if self.refusing_since is not None:
            log.info("publishing works again after %.1f s", clock() - self.refusing_since)
        self.refusing_since, self._backoff = None, BACKOFF_MIN_S

    def _replace_producer(self) -> None:
        """A fresh producer; the old one is closed at once and its answers no longer count. Under exactly-once
        the new one's initialisation aborts the old one's open transaction and fences it."""
        old, self.producer = self.producer, None
        self._generation += 1
        self._unanswered = 0
        if old is not None:
            old.close(timeout_s=0)
        self._producer_ready()

    def _producer_ready(self) -> bool:
        """Make the producer if there is none; while the broker is away that fails: try again later."""
        if self.producer is not None:
            return True
        try:
            self.producer = self.make_producer()
            return True
        except Exception as err:  # noqa: BLE001 - the broker may be away; never a reason to stop
            log.warning("cannot create a Kafka producer yet (%s: %s); retrying", type(err).__name__, err)
            self._resume_at = self._back_off()
            return False

    def _replace_if_stuck(self) -> None:
        """The producer answered none of its pending sends for UNANSWERED_LIMIT_S."""
        if not self._unanswered or clock() - self._answered_at < UNANSWERED_LIMIT_S:
            return
        log.warning("the Kafka producer answered none of %d sends for %.0f s; replacing it, they go out again",
                    self._unanswered, clock() - self._answered_at)
        self._replace_producer()

    def _commit_due(self) -> bool:
        return clock() - self._last_commit >= self.commit_interval_s

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close(timeout_s=10)


class AtLeastOnce(_Delivery):
    one_round = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._commits: queue.SimpleQueue[tuple[dict[TP, int], Exception | None]] = queue.SimpleQueue()

    def step(self) -> None:
        self._settle()
        self._replace_if_stuck()  # after the answers already in: a slow loop is not a stuck producer
        if self._commit_due():
            self._commit(sync=False)

    def _replace_producer(self) -> None:
        """What the old producer has not answered fails over to the retry path at once, whatever it does later: a
        producer that gave up on one send after its delivery timeout may never answer the others (seen:
        kafka-python's after a broker restart), and a fresh one starts clean."""
        super()._replace_producer()
        self.tracker.fail_sent(Refusal.RETRY, "its producer was replaced before it answered")

    def _settle(self) -> None:
        unanswered = self._unanswered
        while True:
            try:
                (tp, epoch, offset, attempt, generation), err = self._answers.get_nowait()
            except queue.Empty:
                break
            if generation != self._generation:
                continue  # from a replaced producer: its sends were failed over when it was replaced
            self._unanswered -= 1
            if err is None:
                entry = self.tracker.answered(tp, epoch, offset, attempt, None, "")
                if entry is not None:
                    if self.refusing_since is not None or self._backoff != BACKOFF_MIN_S:
                        self._recovered()
                    self.on_delivered(entry.message)
                continue
            refusal = self._classify(err)
            if self.tracker.answered(tp, epoch, offset, attempt, refusal, f"{type(err).__name__}: {err}"):
                self._refused(err)  # one that no longer counts (stale epoch or attempt) is not an outage
            if refusal is Refusal.RETRY:  # whether or not it counts: this producer gives up on sends
                log.warning("replacing the Kafka producer: it gave up on a send (%s)", type(err).__name__)
                self._replace_producer()
        if self._unanswered < unanswered:  # this producer answered (a replacement resets the count)
            self._answered_at = clock()
        until = None
        while rounds := self.tracker.failed_rounds():  # again after a replacement failed the others' sends over
            for tp, again in rounds:
                for entry in again:
                    if entry.refusal is Refusal.REJECTED:
                        entry.message = rejected_dead_letter(entry, self.dlq_topic)
                if any(entry.refusal is not None and entry.refusal is not Refusal.REJECTED for entry in again):
                    until = until or self._back_off()
                    self.tracker.hold(tp, until)
        while True:
            try:
                offsets, err = self._commits.get_nowait()
            except queue.Empty:
                break
            if err is not None:
                log.info("commit failed (%s); it is offered again", err)
                self.tracker.commit_failed(offsets)

    def _commit(self, sync: bool) -> None:
        self._last_commit = clock()
        offsets = self.tracker.commit_positions(position=self.consumer.position)
        if not offsets:
            return
        self.tracker.committing(offsets)
        if sync:
            self.consumer.commit(offsets)
        else:
            self.consumer.commit(offsets, lambda err, o=offsets: self._commits.put((o, err)))

    def before_revoke(self, partitions: set[TP]) -> dict[TP, int]:
        """What these partitions have acknowledged since the last commit: committed before they go, so the
        next owner does not publish those results again."""
        offsets = {tp: o for tp, o in self.tracker.commit_positions().items() if tp in partitions}
        self.tracker.committing(offsets)
        return offsets

    def abandon(self) -> None:
        """Revoked partitions' messages in flight stay in flight; their answers no longer count."""

    def flush(self) -> None:
        """Until every message is acknowledged (sent again as needed), then commit and wait for it. A commit the
        broker does not take (it is away, the group moved on) leaves those results to be published again."""
        while self.tracker.sent() or self.tracker.ready():
            if self.interrupted():
                raise Interrupted
            self.publish()
            if self.producer is not None:
                self.producer.flush(timeout_s=1)
            self._settle()
            self._replace_if_stuck()
            time.sleep(0.01)
        self._settle()
        try:
            self._commit(sync=True)
        except Exception as err:  # noqa: BLE001 - at least once: the next owner publishes them again
            log.warning("the last commit failed (%s: %s); the next owner publishes those results again",
                        type(err).__name__, err)


class ExactlyOnce(_Delivery):
    def __init__(self, *args, transaction_timeout_s: float, instance: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.transaction_timeout_s, self.instance = transaction_timeout_s, instance
        self._began: float | None = None
        self._producer_since = clock()

    def _before_send(self) -> None:
        if self._began is None:
            self.producer.begin_transaction()
            self._began = clock()

    def step(self) -> None:
        if self._commit_due():
            self._commit()

    def _commit(self) -> None:
        """Wait for every send's answer, then commit the messages and the offsets they stand for in one
        transaction; any refusal or failure aborts it instead."""
        self._last_commit = clock()
        offsets = self.tracker.commit_positions(include_sent=True, position=self.consumer.position)
        if self._began is None:
            if not offsets or clock() < self._resume_at or not self._producer_ready():
                return
            self.producer.begin_transaction()  # offsets alone (past transaction markers of the input)
            self._began = clock()
        try:
            failure = self._await_answers()
            if failure is not None:
                raise failure
            if offsets:
                self.producer.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
            self.producer.commit_transaction()
        except Exception as err:  # noqa: BLE001 - every failure aborts; `_abort` sorts out which kind
            self._abort(err)
            return
        delivered = self.tracker.sent()
        self.tracker.transaction_committed()
        self.tracker.committing(offsets)
        self._began = None
        self._recovered()
        for entry in delivered:
            self.on_delivered(entry.message)

    def _await_answers(self) -> Exception | None:
        """Every send of the transaction answered (or the transaction timeout passed): the first error, with
        each refused entry noted. A producer flush can raise while answers are still coming (kafka-python:
        a batch split for being too large): answers, not the flush, decide."""
        deadline = clock() + self.transaction_timeout_s
        first = None
        while True:
            while True:
                try:
                    (tp, epoch, offset, attempt, generation), err = self._answers.get_nowait()
                except queue.Empty:
                    break
                if generation != self._generation:
                    continue  # from a producer replaced since
                self._unanswered -= 1
                entry = self.tracker.entry(tp, epoch, offset)
                if err is not None and entry is not None and entry.attempt == attempt:
                    entry.refusal, entry.detail = self._classify(err), f"{type(err).__name__}: {err}"
                    first = first or err
            if self._unanswered <= 0:
                return first
            if self.interrupted():
                raise Interrupted
            if clock() > deadline:
                return first or TimeoutError(f"{self._unanswered} sends unanswered after the transaction timeout")
            self.producer.flush(timeout_s=0.2)

    def _abort(self, err: Exception) -> None:
        """Nothing of the transaction becomes visible: a fresh producer aborts it (kafka-python's own abort
        can leave its state machine stuck after a refused batch), and its messages go out again (a refused
        result as a dead letter) in a new transaction after a backoff."""
        refusal = self._refused(err)
        if refusal is Refusal.FENCED and self._fenced_by_another():
            raise UserError(f"another live worker uses transactional id {self.instance!r} (fenced): "
                            "give each replica its own --instance-id")
        log.warning("transaction aborted (%s: %s); its messages go out again", type(err).__name__, err)
        self._replace_producer()
        for entry in self.tracker.sent():
            if entry.refusal is Refusal.REJECTED:
                entry.message = rejected_dead_letter(entry, self.dlq_topic)
            entry.refusal = None
        self.tracker.transaction_aborted()
        self._began = None
        self._resume_at = self._back_off()

    def _fenced_by_another(self) -> bool:
        """A transaction that outlived the timeout (the broker was away) is aborted by the coordinator, which
        fences this producer too; only a fence of a young transaction and producer comes from another one."""
        now = clock()
        young = now - (self._began or now) < self.transaction_timeout_s
        return young and now - self._producer_since < self.transaction_timeout_s

    def _replace_producer(self) -> None:
        super()._replace_producer()
        self._producer_since = clock()

    def abandon(self) -> None:
        """Partitions were revoked: abort the open transaction, so nothing of it is ever seen."""
        if self._began is None:
            return
        self._replace_producer()
        self.tracker.transaction_aborted()
        self._began = None

    def flush(self) -> None:
        """Commit until nothing is left (each failed transaction is redone)."""
        while self.tracker.ready() or self._began is not None:
            if self.interrupted():
                raise Interrupted
            self.publish()
            self._commit()
            time.sleep(0.01)
