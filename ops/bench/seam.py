"""The real worker loop with Kafka replaced at the client seam (worker/clients.py) by memory, so that a
machine without a broker (the lent GPU machine) measures the worker's own path on its device: polling,
decoding, the tokenizing stage, the batcher, the inference stage, result encoding, the tracker, the
delivery's send rounds and commits. Missing: the broker's network time and the Kafka client library's
own work (kafka-python decodes fetches and encodes batches in Python), so this is the worker's upper bound.

    run = worker_rate(classifier, texts, max_batch_size=256, max_batch_tokens=32768, records=100_000)

The consumer hands out an in-memory backlog over a few partitions; the producer answers every send
from its own thread about a millisecond later, as a client's I/O thread would.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from contract.records import encode_review
from models.classifier import Classifier
from worker.clients import TP, Polled, Record, Refusal
from worker.config import WorkerConfig
from worker.delivery import AtLeastOnce
from worker.inference import InferenceStage
from worker.metrics import PREFIX, Health, WorkerMetrics
from worker.service import GIL_SWITCH_S, Worker

TOPIC, OUT, DLQ = "reviews", "results", "dead-letters"
ANSWER_EVERY_S = 0.001


class MemoryConsumer:
    """A backlog per partition, all assigned at the first poll; commits answered at the next poll."""

    def __init__(self, values: list[bytes], partitions: int = 4) -> None:
        self.logs = {TP(TOPIC, p): values[p::partitions] for p in range(partitions)}
        self.positions = dict.fromkeys(self.logs, 0)
        self.committed = dict.fromkeys(self.logs, 0)
        self._assign = False
        self._paused = False
        self._commit_answers: list[Callable[[Exception | None], None]] = []

    def subscribe(self, topic: str) -> None:
        self._assign = True

    def poll(self, max_records: int, timeout_s: float) -> Polled:
        polled = Polled()
        for on_done in self._commit_answers:
            on_done(None)
        self._commit_answers.clear()
        if self._assign:
            polled.assigned, self._assign = set(self.logs), False
            return polled
        room = 0 if self._paused else max_records
        left = [tp for tp, log in self.logs.items() if self.positions[tp] < len(log)]
        for n, tp in enumerate(left):  # an even share of the room for each partition with records left
            start = self.positions[tp]
            taken = self.logs[tp][start:start + room // (len(left) - n)]
            polled.records += [Record(tp, start + i, None, value, [], 0) for i, value in enumerate(taken)]
            self.positions[tp] += len(taken)
            room -= len(taken)
        if not polled.records and timeout_s > 0:
            time.sleep(timeout_s)  # a real poll waits for records without holding the GIL
        return polled

    def assignment(self) -> set[TP]:
        return set(self.logs)

    def pause_all(self, paused: bool) -> None:
        self._paused = paused

    def position(self, tp: TP) -> int | None:
        return self.positions.get(tp)

    def commit(self, offsets: dict[TP, int], on_done: Callable[[Exception | None], None] | None = None) -> None:
        for tp, offset in offsets.items():
            self.committed[tp] = max(self.committed[tp], offset)
        if on_done is not None:
            self._commit_answers.append(on_done)

    def before_revoke(self, positions: Callable[[set[TP]], dict[TP, int]]) -> None:
        pass  # nothing is ever revoked here

    def group_metadata(self) -> Any:
        return None

    def rejoin(self) -> None:
        pass

    def close(self) -> None:
        pass

    def done(self) -> int:
        """Records committed so far."""
        return sum(self.committed.values())


class MemoryProducer:
    """Acknowledges every send from its own thread, in order, about ANSWER_EVERY_S later."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self._waiting: list[Callable[[Exception | None], None]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._answer, name="memory-producer", daemon=True).start()

    def send(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]],
             on_done: Callable[[Exception | None], None]) -> Exception | None:
        with self._lock:
            self.sent.append((topic, value))
            self._waiting.append(on_done)
        return None

    def _answer(self) -> None:
        while not self._closed.wait(ANSWER_EVERY_S):
            with self._lock:
                answered, self._waiting = self._waiting, []
            for on_done in answered:
                on_done(None)

    def flush(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._waiting and time.monotonic() < deadline:
            time.sleep(ANSWER_EVERY_S)

    def refusal(self, err: Exception) -> Refusal:
        return Refusal.RETRY

    def begin_transaction(self) -> None:
        raise NotImplementedError("the memory seam measures at-least-once only")

    send_offsets_to_transaction = commit_transaction = abort_transaction = begin_transaction

    def close(self, timeout_s: float) -> None:
        self._closed.set()


@dataclass
class SeamRun:
    per_second: float  # between 10 % and 90 % of the records delivered: no start-up, no end of backlog
    forward_busy: float  # share of that span the inference thread spent in forward calls (host work and GIL waits
    #                      included): near 1.0, the forward stage is what holds the loop
    sent: list[tuple[str, bytes]]  # (topic, value) of every message, in the order sent


def worker_rate(classifier: Classifier, texts: list[str], max_batch_size: int, max_batch_tokens: int,
                records: int, partitions: int = 4, timeout_s: float = 600) -> SeamRun:
    """The real worker loop over `records` reviews (texts repeated as needed), run until every record is
    committed, with the worker process's GIL switch interval."""
    values = [encode_review(f"r{i}", texts[i % len(texts)]) for i in range(records)]
    consumer = MemoryConsumer(values, partitions)
    producers: list[MemoryProducer] = []
    delivered = 0

    def make_producer() -> MemoryProducer:
        producers.append(MemoryProducer())
        return producers[-1]

    def make_delivery(tracker, on_delivered) -> AtLeastOnce:
        def counted(message) -> None:
            nonlocal delivered
            delivered += 1
            on_delivered(message)
        return AtLeastOnce(make_producer, consumer, tracker, DLQ, counted, lambda: None, commit_interval_s=0.1)

    config = WorkerConfig(model="memory", input_topic=TOPIC, output_topic=OUT, dlq_topic=DLQ).with_batch_caps(
        max_batch_size, max_batch_tokens, classifier.batch_overhead_tokens)
    encoder = classifier.encoder
    inference = InferenceStage(classifier.score_ids, encoder.probe_ids())
    metrics = WorkerMetrics()
    worker = Worker(config, encoder.tokenize, "memory@0", inference, metrics, Health(), consumer, make_delivery)

    def forward_seconds() -> float:
        return metrics.registry.get_sample_value(PREFIX + "inference_seconds_sum") or 0.0

    consumer.subscribe(TOPIC)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_S)
    deadline = time.perf_counter() + timeout_s
    marks: dict[int, tuple[float, int, float]] = {}  # percent -> (time, delivered, forward seconds) when first reached
    try:
        while consumer.done() < records:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the worker committed {consumer.done()} of {records} records in {timeout_s:.0f} s")
            worker.step()
            for percent in (10, 90):
                if percent not in marks and delivered * 100 >= percent * records:
                    marks[percent] = (time.perf_counter(), delivered, forward_seconds())
    finally:
        sys.setswitchinterval(switch)
        worker.delivery.close()
        inference.close()
        worker.tokenizing.close()
    (t10, d10, s10), (t90, d90, s90) = marks[10], marks[90]
    span = max(t90 - t10, 1e-9)
    return SeamRun((d90 - d10) / span, (s90 - s10) / span, [m for p in producers for m in p.sent])
