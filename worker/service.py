"""The worker's main loop. One thread owns the Kafka consumer and all bookkeeping; the
device runs in `InferenceStage`; the producer's own I/O thread delivers.

    poll → decode/validate → tokenize → pool ─▶ next_batch ─▶ device (encoder + head)
                     └── dead letters ──┐                         │
    commit ◀─ acks ◀─ send ◀─ tracker (partition order) ◀──────────┘
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterable

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from contract.records import Rejection, Source, decode_review, encode_dead_letter, encode_result, label_of
from models.artifact import Artifact
from models.encoder import Encoder
from worker.batcher import BatchCaps, Pending, next_batch, next_deadline, padded_tokens
from worker.config import WorkerConfig
from worker.delivery import AtLeastOnce, ExactlyOnce
from worker.inference import InferenceStage, Scored
from worker.metrics import Health, WorkerMetrics
from worker.tracker import OffsetTracker, Outgoing

log = logging.getLogger("worker")

IDLE_POLL_S = 0.1
KEEPALIVE_POLL_S = 1.0
REJOIN_AFTER_S = 10.0
MAX_REJOINS = 3


class Worker:
    def __init__(self, config: WorkerConfig, encoder: Encoder, artifact: Artifact,
                 inference: InferenceStage, metrics: WorkerMetrics, health: Health,
                 consumer: KafkaConsumer, make_producer: Callable[[], KafkaProducer]) -> None:
        self.config, self.encoder, self.artifact = config, encoder, artifact
        self.inference, self.metrics, self.health = inference, metrics, health
        self.consumer = consumer
        self.caps = BatchCaps(config.max_batch_size, config.max_batch_tokens, config.max_wait_ms / 1000)
        self.tracker = OffsetTracker()
        self.pool: list[Pending] = []
        self.paused = False
        self.stopping = False
        self.last_poll = time.monotonic()
        self.revoked_pending: set[TopicPartition] = set()
        self.assignment_done = False
        self.arrivals = 0
        self.rejoins = 0
        self.subscribed_at = time.monotonic()
        self.rewind: set[TopicPartition] = set()
        parts = (make_producer, consumer, self.tracker, self._delivered, metrics.publish_errors.inc)
        self.delivery = (ExactlyOnce(*parts, commit_interval_s=config.commit_interval_ms / 1000)
                         if config.guarantee == "exactly-once" else AtLeastOnce(*parts))

    # -- lifecycle -----------------------------------------------------------------------------

    def request_stop(self, *_args: object) -> None:
        self.stopping = True

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self._subscribe()
        while not self.stopping:
            self.step()
            self._rejoin_if_left_out()
        log.info("stopping: finishing %d records in hand", len(self.tracker))
        self.drain()
        self.consumer.close()  # leaves the group, so partitions move at once
        self.delivery.producer.close(timeout=10)
        self.inference.close()

    def _subscribe(self) -> None:
        self.consumer.subscribe([self.config.input_topic], listener=_Rebalance(self))
        self.subscribed_at = time.monotonic()

    def _rejoin_if_left_out(self) -> None:
        """kafka-python 3.0 was seen to hand a member an empty assignment right after start (leader
        without the topic's partitions) and never rebalance again. While the topic has partitions and
        this worker owns none, rejoin a few times, at growing intervals (an idle extra worker is left
        alone afterwards)."""
        if self.health.assigned or self.rejoins >= MAX_REJOINS:
            return
        if time.monotonic() - self.subscribed_at < REJOIN_AFTER_S * 2**self.rejoins:
            return
        if self.delivery.producer.partitions_for(self.config.input_topic):
            self.rejoins += 1
            log.warning("no partitions assigned although %s has some; rejoining the group (%d/%d)",
                        self.config.input_topic, self.rejoins, MAX_REJOINS)
            self.consumer.unsubscribe()
            self._subscribe()

    def step(self) -> None:
        self.health.tick()
        self._take_scores(self.inference.collect(timeout=self._idle_wait()))
        self.delivery.publish(self.tracker.release())
        self.delivery.commit()
        self._dispatch(force=False)
        if self._room() > 0 or time.monotonic() - self.last_poll > KEEPALIVE_POLL_S:
            self._poll()
        self.metrics.refresh_throughput()

    def _room(self) -> int:
        """Records that may still be polled: memory stays bounded by count and by bytes under any backlog."""
        if self.tracker.bytes >= self.config.max_in_flight_bytes:
            return 0
        return self.config.max_in_flight - len(self.tracker)

    def _idle_wait(self) -> float:
        """Block on the device, not on Kafka, when polling cannot help: no room, or work already queued."""
        if self.inference.busy and (self._room() <= 0 or not self.inference.has_room()):
            return 0.05
        return 0.0

    def drain(self) -> None:
        """Finish everything in hand: run the pool, publish all results, wait for delivery, commit."""
        while self.pool or self.inference.busy:
            self._dispatch(force=True)
            self._take_scores(self.inference.collect(timeout=0.5))
        self.delivery.publish(self.tracker.release())
        self.delivery.flush()

    # -- stages --------------------------------------------------------------------------------

    def _poll(self) -> None:
        """Fetch up to the room left; at the cap, poll with every partition paused so the group keeps us."""
        room = self._room()
        self._pause(room <= 0)
        timeout = self._poll_timeout() if room > 0 else 0.0
        batches = self.consumer.poll(timeout_ms=int(timeout * 1000), max_records=max(1, room))
        self.last_poll = time.monotonic()
        self._rebalanced()
        records = [r for rs in batches.values() for r in rs]
        if records:
            self._accept(records)

    def _poll_timeout(self) -> float:
        """Short while a waiting batch must go as soon as the device frees up, else until its deadline."""
        if self.pool and self.inference.busy:
            return 0.005
        deadline = next_deadline(self.pool, self.caps)
        if deadline is None:
            return IDLE_POLL_S
        return max(0.0, min(IDLE_POLL_S, deadline - time.monotonic()))

    def _pause(self, full: bool) -> None:
        """At the in-flight cap, keep polling (group membership) but fetch nothing: memory stays bounded."""
        if full != self.paused:
            assigned = list(self.consumer.assignment())
            if full:
                self.consumer.pause(*assigned)
            else:
                self.consumer.resume(*assigned)
            self.paused = full

    def _accept(self, records: list[ConsumerRecord]) -> None:
        self.metrics.consumed.inc(len(records))
        now = time.monotonic()
        valid: list[tuple[ConsumerRecord, object]] = []
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            self.tracker.add(tp, record.offset, len(record.value or b""))
            source = Source(record.topic, record.partition, record.offset)
            decoded = decode_review(record.value, source, self.config.max_record_bytes)
            if isinstance(decoded, Rejection):
                self.tracker.complete(Outgoing(
                    tp, record.offset, self.config.dlq_topic, record.key,
                    encode_dead_letter(decoded, record.value, source), list(record.headers or []),
                    record.timestamp, decoded.code.value, is_result=False))
                continue
            valid.append((record, decoded))
        if not valid:
            return
        tokens = self.encoder.tokenize([review.text for _, review in valid])
        self.metrics.truncated.inc(sum(tokens.truncated))
        for (record, review), ids in zip(valid, tokens.ids, strict=True):
            tp = TopicPartition(record.topic, record.partition)
            self.arrivals += 1
            self.pool.append(Pending((tp, record.offset), ids, now, (record, review), self.arrivals))

    def _dispatch(self, force: bool) -> None:
        """Keep up to the inference depth queued; `next_batch` decides which batch may go."""
        while self.pool and self.inference.has_room():
            caps = BatchCaps(self.caps.max_size, self.caps.max_tokens, 0.0) if force else self.caps
            batch = next_batch(self.pool, caps, time.monotonic(), device_busy=bool(self.inference.busy) and not force)
            if batch is None:
                return
            chosen = {id(p) for p in batch}
            self.pool = [p for p in self.pool if id(p) not in chosen]
            self.inference.submit(batch)

    def _take_scores(self, done: Iterable[Scored]) -> None:
        for scored in done:
            real = sum(p.length for p in scored.batch)
            self.metrics.observe_batch(len(scored.batch), real, padded_tokens(scored.batch), scored.seconds)
            at = time.time()
            for pending, score in zip(scored.batch, scored.scores.tolist(), strict=True):
                if not self.tracker.holds(*pending.key):
                    continue  # its partition was let go while it was on the device
                record, review = pending.payload
                source = Source(record.topic, record.partition, record.offset)
                value = encode_result(review, score, self.artifact.model_id, source, at)
                self.tracker.complete(Outgoing(
                    pending.key[0], record.offset, self.config.output_topic, record.key, value,
                    list(record.headers or []), record.timestamp, label_of(score), is_result=True))

    def _delivered(self, message: Outgoing) -> None:
        if message.is_result:
            self.metrics.classified.labels(message.outcome).inc()
            self.metrics.latency.observe(max(0.0, time.time() - message.timestamp_ms / 1000))
        else:
            self.metrics.dead_lettered.labels(message.outcome).inc()
        self.metrics.delivered()

    # -- rebalance -----------------------------------------------------------------------------
    # The client calls these on its I/O thread while the main thread waits in poll(), so they only
    # take note; `_rebalanced` does the work on the main thread once poll() returns.

    def revoked(self, partitions: list[TopicPartition]) -> None:
        self.revoked_pending.update(partitions)
        self.health.assigned = self.health.assigned - set(partitions)

    def assigned(self, partitions: list[TopicPartition]) -> None:
        self.assignment_done = True
        self.metrics.rebalances.inc()
        self.health.assigned = self.health.assigned | set(partitions)
        log.info("assigned %s", sorted(f"{tp.topic}:{tp.partition}" for tp in partitions))

    def _rebalanced(self) -> None:
        """Drop the work in hand of revoked partitions at once (never commit what was not sent); once
        the rebalance has completed, restart those we own again from their committed offsets. Under
        exactly-once the open transaction is aborted, so that holds for every partition."""
        if self.revoked_pending:
            gone = set(self.revoked_pending)
            self.revoked_pending.clear()
            if self.delivery.abandon():
                gone |= set(self.consumer.assignment())
            self._drop(gone)
            self.rewind |= gone
        if self.assignment_done:
            self.assignment_done = False
            back = self.rewind & set(self.consumer.assignment())
            self._drop(back)  # anything fetched for them mid-rebalance is fetched again
            for tp in back:
                committed = self.consumer.committed(tp)
                if committed is None:
                    self.consumer.seek_to_beginning(tp)
                else:
                    self.consumer.seek(tp, committed)
            self.rewind.clear()
            self.paused = False

    def _drop(self, partitions: set[TopicPartition]) -> None:
        self.tracker.forget(partitions)
        self.pool = [p for p in self.pool if p.key[0] not in partitions]


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        try:
            self.worker.revoked(list(revoked))
        except Exception:  # the client hides the cause behind a generic error
            log.exception("handling revoked partitions failed")
            raise

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        try:
            self.worker.assigned(list(assigned))
        except Exception:
            log.exception("handling assigned partitions failed")
            raise
