"""Delivery guarantees: who decides that consumed offsets may be committed.

`AtLeastOnce` sends asynchronously and commits (asynchronously, as soon as they move) a
partition's offsets only up to the first message the broker has not acknowledged (acks=all),
so that a crash repeats at most the messages of about one batch. `ExactlyOnce` wraps what it sends and
the consumed offsets in one Kafka transaction (the consume-transform-produce loop of
confluent-kafka's eos_transactions example), committed every `commit_interval_s`.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from worker.tracker import OffsetTracker, Outgoing

log = logging.getLogger(__name__)

OnDelivered = Callable[[Outgoing], None]
RETRY_BACKOFF_MIN_S = 0.1
RETRY_BACKOFF_MAX_S = 5.0
RENEW_AFTER_ROUNDS = 3


class AtLeastOnce:
    def __init__(self, make_producer: Callable[[], KafkaProducer], consumer: KafkaConsumer, tracker: OffsetTracker,
                 on_delivered: OnDelivered, on_error: Callable[[], None]) -> None:
        self.make_producer = make_producer
        self.producer, self.consumer, self.tracker = make_producer(), consumer, tracker
        self.on_delivered, self.on_error = on_delivered, on_error
        self._done: queue.SimpleQueue[tuple[Outgoing, Exception | None]] = queue.SimpleQueue()
        self.outstanding = 0  # sent or waiting to be sent again, not yet acknowledged
        self._retry: list[Outgoing] = []
        self._retry_at = 0.0
        self._backoff = RETRY_BACKOFF_MIN_S
        self._failed_rounds = 0

    def _send(self, message: Outgoing) -> None:
        future = self.producer.send(message.topic, key=message.key, value=message.value, headers=message.headers)
        future.add_callback(lambda _md, m=message: self._done.put((m, None)))
        future.add_errback(lambda err, m=message: self._done.put((m, err)))
        self.outstanding += 1

    def publish(self, messages: list[Outgoing]) -> None:
        for message in messages:
            self._send(message)

    def settle(self) -> None:
        """Take in the broker's answers. A message that failed after the client's own retries is sent
        again after a backoff (up to 5 s), for as long as it takes: its offset is not committed meanwhile."""
        while True:
            try:
                message, err = self._done.get_nowait()
            except queue.Empty:
                break
            self.outstanding -= 1
            if err is None:
                self.tracker.acked(message.tp, message.offset)
                self.on_delivered(message)
                if not self._retry:
                    self._backoff, self._failed_rounds = RETRY_BACKOFF_MIN_S, 0
                continue
            if not self._retry:
                log.warning("publishing to %s fails (%s: %s); retrying with backoff, not committing",
                            message.topic, type(err).__name__, err)
                self._retry_at = time.monotonic() + self._backoff
                self._backoff = min(RETRY_BACKOFF_MAX_S, self._backoff * 2)
                self._failed_rounds += 1
            self.on_error()
            self._retry.append(message)
            self.outstanding += 1
        if self._retry and time.monotonic() >= self._retry_at:
            if self._failed_rounds >= RENEW_AFTER_ROUNDS:
                self._renew_producer()
            again, self._retry = self._retry, []
            self.outstanding -= len(again)
            for message in again:
                self._send(message)

    def _renew_producer(self) -> None:
        """A client that keeps failing may hold stale state (seen: it went on refusing after the broker
        accepted again); a fresh one starts clean. Its unsent messages fail over to the retry list."""
        log.warning("replacing the Kafka producer after %d failed rounds", self._failed_rounds)
        old, self.producer = self.producer, self.make_producer()
        old.close(timeout=0)
        self._failed_rounds = 0

    def commit(self, force: bool = False) -> None:
        """Commit positions that moved; `force` (drain, rebalance, shutdown) waits for the broker's answer."""
        self.settle()
        positions = self.tracker.positions()
        if positions:
            offsets = {tp: OffsetAndMetadata(pos, "", -1) for tp, pos in positions.items()}
            if force:
                self.consumer.commit(offsets)
            else:
                self.consumer.commit_async(offsets)

    def abandon(self) -> bool:
        """Partitions were revoked; what is in flight stays in flight. Returns whether sent work was voided."""
        return False

    def flush(self) -> None:
        """Wait until every sent message is acknowledged, then commit."""
        while self.outstanding:
            self.producer.flush(timeout=30)
            self.settle()
            if self.outstanding:
                time.sleep(0.05)
        self.commit(force=True)


class ExactlyOnce:
    def __init__(self, make_producer: Callable[[], KafkaProducer], consumer: KafkaConsumer, tracker: OffsetTracker,
                 on_delivered: OnDelivered, on_error: Callable[[], None], commit_interval_s: float) -> None:
        self.producer, self.consumer, self.tracker = make_producer(), consumer, tracker
        self.on_delivered, self.on_error = on_delivered, on_error
        self.commit_interval_s = commit_interval_s
        self._sent: list[Outgoing] = []
        self._began: float | None = None
        self.producer.init_transactions()

    @property
    def outstanding(self) -> int:
        return len(self._sent)

    def publish(self, messages: list[Outgoing]) -> None:
        if not messages:
            return
        if self._began is None:
            self.producer.begin_transaction()
            self._began = time.monotonic()
        for message in messages:
            self.producer.send(message.topic, key=message.key, value=message.value, headers=message.headers)
        self._sent.extend(messages)

    def settle(self) -> None:
        """Nothing to do: delivery is known only when the transaction commits."""

    def commit(self, force: bool = False) -> None:
        if self._began is None or (not force and time.monotonic() - self._began < self.commit_interval_s):
            return
        self.tracker.acked_all_sent()
        positions: dict[TopicPartition, int] = self.tracker.positions()
        try:
            if positions:
                self.producer.send_offsets_to_transaction(
                    {tp: OffsetAndMetadata(pos, "", -1) for tp, pos in positions.items()},
                    self.consumer.group_metadata())
            self.producer.commit_transaction()
        except KafkaError:
            self.on_error()
            raise
        for message in self._sent:
            self.on_delivered(message)
        self._sent.clear()
        self._began = None

    def abandon(self) -> bool:
        """Partitions were revoked: abort the open transaction, so nothing of it is ever seen."""
        if self._began is None:
            return False
        self.producer.abort_transaction()
        self._sent.clear()
        self._began = None
        return True

    def flush(self) -> None:
        self.commit(force=True)
