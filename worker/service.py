"""The worker's main loop. One thread owns the consumer and all bookkeeping; tokenizing runs in
`TokenizingStage`, the device in `InferenceStage`; the producer's own I/O thread delivers. A
record's path, top to bottom:

    poll ─ events: revoked → drop that work (abort the transaction) · assigned → new epoch
         └ records → decode/validate ─▶ tokenize ─▶ batch queue ──────▶ device (encoder + head)
                └── dead letters ──┐                                          │
    commit ◀─ answers ◀─ send ◀─ tracker (partition order, epoch) ◀─ result ◀─┘

Any failure of one record (decoding, tokenizing, the model, encoding its result, the output
topic refusing it) makes that record a dead letter; nothing a record holds stops the loop.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable

import numpy as np

from contract.records import (
    DeadLetterCode,
    Rejection,
    Review,
    Source,
    decode_review,
    encode_dead_letter,
    encode_result,
    label_of,
)
from worker.batcher import BatchCaps, BatchQueue, Pending, padded_tokens
from worker.clients import TP, ConsumerClient, Polled, Record
from worker.config import WorkerConfig
from worker.delivery import AtLeastOnce, Interrupted
from worker.inference import InferenceStage, Scored
from worker.memory import MemoryTrim
from worker.metrics import Health, WorkerMetrics
from worker.tokenizing import Tokenize, Tokenized, TokenizingStage
from worker.tracker import OffsetTracker, Outgoing

log = logging.getLogger("worker")

IDLE_POLL_S = 0.1
KEEPALIVE_POLL_S = 1.0
# the batch queue sorts the oldest 16 batches' worth of records, and never fewer than 4096 (see worker/batcher.py):
# padding depends on how many records are sorted together (1024 SST-2 reviews at 64 rows padded 0.87)
SORT_WINDOW_BATCHES, SORT_WINDOW_MIN = 16, 4096
REVOKE_WAIT_S = 1.0  # longest a client's revoke callback waits for the loop's bookkeeping
# How long a thread may hold the GIL while another waits for it. The stages hand work to each other through threads
# that wait for it after their C/Rust part (the tokenizer, the forward, the clients' I/O); at the default 5 ms each
# hand-off could wait that long behind the loop's Python. Measured with 1 ms, same run, 60,000 records, tiny model,
# tokenizing jobs of 256: kafka-python 6,631 -> 6,898 records/s, confluent 8,176 -> 8,485 (3 runs each).
GIL_SWITCH_S = 0.001  # the worker process sets it (worker/__main__.py), and so does the memory-seam benchmark


class Worker:
    def __init__(self, config: WorkerConfig, tokenize: Tokenize, model_id: str, inference: InferenceStage,
                 metrics: WorkerMetrics, health: Health, consumer: ConsumerClient,
                 make_delivery: Callable[[OffsetTracker, Callable[[Outgoing], None]], AtLeastOnce]) -> None:
        self.config, self.model_id = config, model_id
        self.tokenizing = TokenizingStage(tokenize)
        self.inference, self.metrics, self.health, self.consumer = inference, metrics, health, consumer
        self.pool = BatchQueue(BatchCaps(config.max_batch_size, config.max_batch_tokens, config.max_wait_ms / 1000,
                                         config.batch_overhead_tokens),
                               window=max(SORT_WINDOW_MIN, SORT_WINDOW_BATCHES * config.max_batch_size))
        self.tracker = OffsetTracker()
        metrics.in_hand.set_function(lambda: len(self.tracker))
        self.delivery = make_delivery(self.tracker, self._delivered)
        self.delivery.interrupted = lambda: self.interrupted
        self._owner = threading.Lock()  # held by the loop except while it polls: see _before_revoke
        consumer.before_revoke(self._before_revoke)
        self.paused: bool | None = False
        self.stopping = False
        self.interrupted = False
        self.last_poll = time.monotonic()
        self.memory = MemoryTrim(self.last_poll)
        self.arrivals = 0
        self.delivered: Counter[tuple[bool, str]] = Counter()  # (is a result, label or code) since `_count`
        self.result_timestamps: list[int] = []  # input timestamps (ms) of the results delivered since `_count`

    # -- lifecycle -----------------------------------------------------------------------------

    def request_stop(self, *_args: object) -> None:
        """The first signal drains; a second ends the drain at once."""
        self.interrupted = self.stopping
        self.stopping = True

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.consumer.subscribe(self.config.input_topic)
        while not self.stopping:
            self.step()
        log.info("stopping: finishing %d records in hand", len(self.tracker))
        self.drain()
        self.consumer.close()  # a dynamic member leaves the group, so its partitions move at once
        self.delivery.close()
        self.inference.close()
        self.tokenizing.close()

    def step(self) -> None:
        with self._owner:
            self._step()
        self.memory.tick(time.monotonic())  # outside the lock: a revoke callback never waits for it

    def _step(self) -> None:
        self.health.tick()
        self._take_scores(self.inference.collect(timeout=self._idle_wait()))
        self.delivery.publish()
        self.delivery.step()
        self._count()
        self.health.refusing_since = self.delivery.refusing_since
        self._pool(self.tokenizing.collect())
        self._dispatch(force=False)
        if self._room() > 0 or time.monotonic() - self.last_poll > KEEPALIVE_POLL_S:
            self._poll()
        self.metrics.refresh_throughput()

    def drain(self) -> None:
        """Finish everything in hand: run the pool, publish and commit as it goes (transactions stay
        short), then wait until every message is acknowledged and commit. A second signal stops it."""
        with self._owner:
            self._drain()

    def _drain(self) -> None:
        while self.pool or self.inference.busy or self.tokenizing.busy:
            if self.interrupted:
                raise Interrupted
            self._pool(self.tokenizing.collect(timeout=0.01))
            self._dispatch(force=True)
            self._take_scores(self.inference.collect(timeout=0.1))
            self.delivery.publish()
            self.delivery.step()
            self._count()
        try:
            self.delivery.flush()
        finally:
            self._count()

    def _room(self) -> int:
        """Records that may still be polled: memory stays bounded by count and by bytes under any backlog."""
        if self.tracker.bytes >= self.config.max_in_flight_bytes:
            return 0
        return self.config.max_in_flight - len(self.tracker)

    def _idle_wait(self) -> float:
        """Block on the device, not on Kafka, when polling cannot help: no room, or work already queued."""
        if self.inference.busy and (self._room() <= 0 or not self.inference.has_room()):
            return 0.05
        if self._room() <= 0:
            return 0.01  # waiting for the broker's answers: no reason to spin
        return 0.0

    # -- stages --------------------------------------------------------------------------------

    def _poll(self) -> None:
        """Fetch up to the room left; at the cap, poll with every partition paused so the group keeps us."""
        room = self._room()
        if (room <= 0) is not self.paused:
            self.paused = room <= 0
            self.consumer.pause_all(self.paused)
        timeout = self._poll_timeout() if room > 0 else 0.0
        self._owner.release()  # a revoke callback may run meanwhile (inside this poll, or on the client's thread)
        try:
            polled = self.consumer.poll(max_records=max(1, room), timeout_s=timeout)
        finally:
            self._owner.acquire()
        self.last_poll = time.monotonic()
        self._rebalanced(polled)
        if polled.records:
            self._accept(polled.records)

    def _poll_timeout(self) -> float:
        """Short while a waiting batch must go as soon as the device frees up or tokens are coming, else until
        the pool's deadline."""
        if (self.pool and self.inference.busy) or self.tokenizing.busy:
            return 0.005
        deadline = self.pool.deadline()
        if deadline is None:
            return IDLE_POLL_S
        return max(0.0, min(IDLE_POLL_S, deadline - time.monotonic()))

    def _rebalanced(self, polled: Polled) -> None:
        """Revoked partitions: their work is dropped, never committed (exactly-once aborts the open
        transaction: the rest of it goes out again). Assigned ones start a new epoch at their committed
        offsets, so nothing computed before can complete them."""
        if polled.revoked:
            self.delivery.abandon()
            for tp in polled.revoked:
                self.tracker.close(tp)
            self._drop(polled.revoked)
        if polled.assigned or polled.revoked:
            for tp in polled.assigned:
                self.tracker.open(tp)
            self._drop(polled.assigned)
            self.paused = None  # the client may keep a partition's pause across a rebalance: set it again
            owned = self.consumer.assignment()
            for tp in self.tracker.partitions() - owned:
                self.tracker.close(tp)
            self.health.assigned = frozenset(owned)
        if polled.assigned:
            self.health.joined = True
            self.metrics.rebalances.inc()
            log.info("assigned %s", sorted(f"{tp.topic}:{tp.partition}" for tp in polled.assigned))

    def _before_revoke(self, partitions: set[TP]) -> dict[TP, int]:
        """The client is about to give these partitions up: what they have acknowledged is committed first
        (at-least-once). Runs on the client's thread or inside our poll, so it waits for the loop's
        bookkeeping to be between steps or polling; if that takes too long, those results are redone."""
        if not self._owner.acquire(timeout=REVOKE_WAIT_S):
            return {}
        try:
            return self.delivery.before_revoke(partitions)
        finally:
            self._owner.release()

    def _drop(self, partitions: set[TP]) -> None:
        self.pool.drop(partitions)

    def _accept(self, records: list[Record]) -> None:
        """Decode, and hand the valid ones to the tokenizer, at most a sort window's worth per job: a first poll
        of 8192 as one job held the pool empty and the device idle until all of it was tokenized, while smaller
        jobs would reach the batch queue as full batches before the window could sort them (padding); any
        record that fails here becomes its dead letter, alone."""
        self.metrics.consumed.inc(len(records))
        now = time.monotonic()
        valid: list[tuple[Record, int, Review, Source, float]] = []
        add, max_bytes = self.tracker.add, self.config.max_record_bytes
        for record in records:
            epoch = add(record)
            if epoch is None:
                log.warning("dropped a record of %s, which is not assigned here", record.tp)
                continue
            source = Source(record.tp.topic, record.tp.partition, record.offset)
            try:
                decoded = (Rejection(DeadLetterCode.INTERNAL_ERROR, record.unreadable) if record.unreadable
                           else decode_review(record.value, source, max_bytes))
            except Exception as err:  # noqa: BLE001 - an unforeseen case is a dead letter and a bug report
                decoded = _internal(err)
            if isinstance(decoded, Rejection):
                self._dead_letter(record, epoch, decoded)
            else:
                valid.append((record, epoch, decoded, source, now))
        size = self.pool.window or max(1, len(valid))
        for i in range(0, len(valid), size):
            part = valid[i:i + size]
            self.tokenizing.submit(part, [item[2].text for item in part])

    def _pool(self, done: list[Tokenized]) -> None:
        """Tokenized records join the batcher's pool, in the order they were polled, unless their partition
        was let go meanwhile; a text the tokenizer failed on is a dead letter."""
        pending: list[Pending] = []
        current: dict[tuple[TP, int], bool] = {}  # (partition, epoch polled in) -> that epoch is still the current one
        for tokenized in done:
            for i, (record, epoch, review, source, arrived) in enumerate(tokenized.items):
                tp = record.tp
                if (tp, epoch) not in current:
                    current[(tp, epoch)] = self.tracker.epoch(tp) == epoch
                if not current[(tp, epoch)]:
                    continue
                if i in tokenized.errors:
                    self._dead_letter(record, epoch, _internal(tokenized.errors[i]))
                    continue
                if tokenized.truncated[i]:
                    self.metrics.truncated.inc()
                self.arrivals += 1
                pending.append(Pending((tp, record.offset), tokenized.ids[i], arrived, (record, epoch, review, source),
                                       self.arrivals))
        if pending:
            self.pool.append(pending)

    def _dispatch(self, force: bool) -> None:
        """Keep up to the inference depth queued; the batch queue decides which batch may go."""
        while self.pool and self.inference.has_room():
            batch = self.pool.take(time.monotonic(), device_busy=bool(self.inference.busy), force=force)
            if batch is None:
                return
            self.inference.submit(batch)

    def _take_scores(self, done: list[Scored]) -> None:
        for scored in done:
            real = sum(p.length for p in scored.batch)
            self.metrics.observe_batch(len(scored.batch), real, padded_tokens(scored.batch), scored.seconds)
            at = time.time()
            scores = scored.scores.tolist()
            complete, model, topic = self.tracker.complete, self.model_id, self.config.output_topic
            for row, pending in enumerate(scored.batch):
                # a record whose partition was let go (and maybe came back) while it was on the device no longer
                # completes: `complete` ignores it
                record, epoch, review, source = pending.payload
                if row in scored.failed:
                    self._dead_letter(record, epoch, Rejection(DeadLetterCode.MODEL_ERROR, scored.failed[row]))
                    continue
                score = scores[row]
                try:
                    value = encode_result(review, score, model, source, at)
                except Exception as err:  # noqa: BLE001
                    self._dead_letter(record, epoch, _internal(err))
                    continue
                message = Outgoing(record, topic, value, label_of(score), is_result=True)
                complete(record.tp, epoch, record.offset, message)

    def _dead_letter(self, record: Record, epoch: int, rejection: Rejection) -> None:
        value = encode_dead_letter(rejection, record.value, self._source(record))
        self.tracker.complete(record.tp, epoch, record.offset, Outgoing(
            record, self.config.dlq_topic, value, rejection.code.value, is_result=False))

    @staticmethod
    def _source(record: Record) -> Source:
        return Source(record.tp.topic, record.tp.partition, record.offset)

    def _delivered(self, message: Outgoing) -> None:
        """Counted here, added to the metrics once a step (`_count`): a lock per counter, not per message."""
        self.delivered[(message.is_result, message.outcome)] += 1
        if message.is_result:
            self.result_timestamps.append(message.record.timestamp_ms)

    def _count(self) -> None:
        for (is_result, outcome), count in self.delivered.items():
            (self.metrics.classified if is_result else self.metrics.dead_lettered).labels(outcome).inc(count)
            self.metrics.delivered(count)
        self.delivered.clear()
        if self.result_timestamps:
            sent_at = np.array(self.result_timestamps, dtype=np.float64) / 1000
            self.metrics.latency.observe(np.maximum(0.0, time.time() - sent_at))
            self.result_timestamps.clear()


def _internal(err: BaseException) -> Rejection:
    return Rejection(DeadLetterCode.INTERNAL_ERROR, f"{type(err).__name__}: {str(err)[:300]}")
