"""Fake Kafka for deterministic tests of the worker's loop: a broker log, a kafka-python-shaped
consumer (so the kafka-python adapter's own rebalance handling runs), a producer at the client
seam, and a driver that runs the real `Worker` step by step and checks the delivery invariants
after every step. Tests script rebalances and refusals at chosen moments; nothing here sleeps.

Integration tests never use this: they run against a real broker.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
from kafka import TopicPartition
from kafka.consumer.subscription_state import TopicPartitionState

from models.classifier import BATCH_CAPS, BATCH_OVERHEAD_TOKENS
from models.encoder import Tokens
from worker import delivery as delivery_module
from worker.clients import TP, Refusal
from worker.config import WorkerConfig
from worker.delivery import AtLeastOnce, ExactlyOnce
from worker.inference import InferenceStage
from worker.kafka_python import KafkaPythonConsumer
from worker.metrics import Health, WorkerMetrics
from worker.service import Worker

IN, OUT, DLQ = "in", "out", "dlq"


class Retriable(Exception):
    """A refusal that may pass."""


class TooLarge(Exception):
    """A refusal that never passes."""


class Fenced(Exception):
    """The transactional producer lost its epoch."""


@dataclass
class Msg:
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list = field(default_factory=list)
    timestamp: int = 0


class Broker:
    """Topics as lists of messages, and the group's committed offsets with their history."""

    def __init__(self) -> None:
        self.logs: dict[tuple[str, int], list[Msg]] = defaultdict(list)
        self.committed: dict[TP, int] = {}
        self.commit_history: list[tuple[TP, int]] = []

    def append(self, topic: str, partition: int, key, value, headers=()) -> int:
        log = self.logs[(topic, partition)]
        log.append(Msg(len(log), key, value, list(headers), 1_000))
        return len(log) - 1

    def commit(self, offsets: dict[TP, int]) -> None:
        for tp, offset in offsets.items():
            self.committed[tp] = offset
            self.commit_history.append((tp, offset))

    def published(self) -> list[dict]:
        """Source of every visible output and dead letter, in log order: (topic, partition, offset)."""
        import json

        out = []
        for topic in (OUT, DLQ):
            for msg in self.logs[(topic, 0)]:
                body = json.loads(msg.value)
                out.append(dict(body["source"], topic_out=topic, body=body))
        return out


def listen(call) -> None:
    """Run a rebalance listener's method as kafka-python does: awaited when it is a coroutine."""
    if inspect.iscoroutine(call):
        asyncio.run(call)


class FakeKafkaConsumer:
    """The subset of kafka-python's KafkaConsumer the adapter uses. Like kafka-python 3.0 it keeps a
    partition's state (its fetch position) across an eager rebalance, starts a partition without a
    position at its committed offset, and `rebalance(..., same_poll=True)` makes the poll that completes
    the rebalance also return records fetched from the old position."""

    def __init__(self, broker: Broker, partitions: int) -> None:
        self.broker, self.partitions = broker, partitions
        self.listener = None
        self._assignment: set[TopicPartition] = set()
        self._paused: set[TopicPartition] = set()
        self.states: dict[TopicPartition, TopicPartitionState] = {}  # kafka-python's, positions in them
        self._script: list[tuple[set[int], bool]] = []
        self._pending_assign: set[TopicPartition] | None = None
        self._subscription = SimpleNamespace(assignment=self.states, _lock=threading.Lock())
        self._coordinator = SimpleNamespace(_commit_offsets_sync_async=self._commit_async_coroutine,
                                            _offset_fetch_futures={})
        self.revoke_commits: list[dict[TP, int]] = []  # what the listener committed before a revoke
        self.failures: list[Exception] = []  # the next polls raise these, after running the listeners
        self.commit_failures: list[Exception] = []  # the next synchronous commits raise these

    # the script
    def rebalance(self, partitions: set[int], same_poll: bool = True) -> None:
        self._script.append((partitions, same_poll))

    # kafka-python's API
    def subscribe(self, topics, listener=None) -> None:
        self.listener = listener
        self.rebalance(set(range(self.partitions)))

    def unsubscribe(self) -> None:
        self._assignment = set()

    def poll(self, timeout_ms: int = 0, max_records: int = 500) -> dict:
        stale: dict = {}
        if self._pending_assign is not None:
            stale = self._fetch(max_records)
            self._assign(self._pending_assign)
            self._pending_assign = None
            return stale
        if self._script:
            partitions, same_poll = self._script.pop(0)
            new = {TopicPartition(IN, p) for p in partitions}
            listen(self.listener.on_partitions_revoked(sorted(self._assignment)))
            if not same_poll:
                self._assignment = set()
                self._pending_assign = new
                return {}
            stale = self._fetch(max_records)  # fetched before the rebalance finished, from the old position
            self._assign(new)
            self._fail()
            return stale
        self._fail()
        return self._fetch(max_records)

    def _fail(self) -> None:
        if self.failures:
            raise self.failures.pop(0)

    def _assign(self, new: set[TopicPartition]) -> None:
        self._assignment = new
        self._paused &= new
        for tp in set(self.states) - new:
            del self.states[tp]
        for tp in new:
            self.states.setdefault(tp, TopicPartitionState())  # kept across the rebalance, as kafka-python does
        listen(self.listener.on_partitions_assigned(sorted(new)))

    def _fetch(self, max_records: int) -> dict:
        out: dict = {}
        for tp in sorted(self._assignment - self._paused):
            state = self.states[tp]
            if not state.has_valid_position:  # the client fetches the committed offset first
                state.seek(self.broker.committed.get(TP(tp.topic, tp.partition), 0))
            log = self.broker.logs[(tp.topic, tp.partition)]
            start = state.position.offset
            chunk = log[start : start + max_records]
            max_records -= len(chunk)
            if chunk:
                out[tp] = [SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=m.offset, key=m.key,
                                           value=m.value, headers=m.headers, timestamp=m.timestamp) for m in chunk]
                state.seek(start + len(chunk))
        return out

    @property
    def positions(self) -> dict[TopicPartition, int]:
        return {tp: state.position.offset for tp, state in self.states.items() if state.has_valid_position}


    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def pause(self, *tps) -> None:
        self._paused |= set(tps)

    def resume(self, *tps) -> None:
        self._paused -= set(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.states[tp].seek(offset)

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(self.partitions))

    def commit(self, offsets) -> None:
        if self.commit_failures:
            raise self.commit_failures.pop(0)
        self.broker.commit({TP(tp.topic, tp.partition): om.offset for tp, om in offsets.items()})

    def commit_async(self, offsets, callback=None) -> None:
        self.broker.commit({TP(tp.topic, tp.partition): om.offset for tp, om in offsets.items()})
        if callback:
            callback(offsets, None)

    async def _commit_async_coroutine(self, offsets, timeout_ms=None) -> None:  # the coordinator's, awaited
        self.revoke_commits.append({TP(tp.topic, tp.partition): om.offset for tp, om in offsets.items()})
        self.broker.commit({TP(tp.topic, tp.partition): om.offset for tp, om in offsets.items()})

    def group_metadata(self) -> str:
        return "generation"

    def close(self) -> None:
        self._assignment = set()


class FakeProducer:
    """A producer at the client seam. Sends wait for `answer()` (or a flush); `refuse` scripts refusals.
    Transactional sends become visible at commit_transaction, with the offsets they carry."""

    def __init__(self, broker: Broker, transactional: bool) -> None:
        self.broker, self.transactional = broker, transactional
        self.waiting: list[tuple[str, bytes | None, bytes, list, Callable]] = []
        self.refuse: Callable[[str, bytes], Exception | None] = lambda topic, value: None
        self.commit_error: Exception | None = None
        self.before_commit: Callable[[], None] = lambda: None
        self.auto_answer = False  # answer each send at once (as a broker on loopback nearly does)
        self.stuck = False  # answers nothing, not even on flush (until unstuck)
        self._txn: list[tuple[str, bytes | None, bytes, list]] | None = None
        self._offsets: dict[TP, int] = {}
        self.closed = False

    def send(self, topic, key, value, headers, on_done) -> Exception | None:
        assert not self.closed
        assert not self.transactional or self._txn is not None, "a transactional send outside a transaction"
        self.waiting.append((topic, key, value, headers, on_done))
        if self.auto_answer:
            self.answer()
        return None

    def answer(self, count: int | None = None) -> None:
        """The broker answers the oldest `count` sends (all by default)."""
        if self.stuck:
            return
        now, self.waiting = self.waiting[:count], self.waiting[len(self.waiting[:count]):]
        for topic, key, value, headers, on_done in now:
            err = self.refuse(topic, value)
            if err is None:
                if self.transactional:
                    self._txn.append((topic, key, value, headers))
                else:
                    self.broker.append(topic, 0, key, value, headers)
            on_done(err)

    def flush(self, timeout_s: float) -> None:
        self.answer()

    def refusal(self, err: Exception) -> Refusal:
        return {TooLarge: Refusal.REJECTED, Fenced: Refusal.FENCED}.get(type(err), Refusal.RETRY)

    def begin_transaction(self) -> None:
        assert self._txn is None, "a transaction is already open"
        self._txn, self._offsets = [], {}

    def send_offsets_to_transaction(self, offsets, group_metadata) -> None:
        self._offsets.update(offsets)

    def commit_transaction(self) -> None:
        assert self._txn is not None
        self.before_commit()
        if self.commit_error is not None:
            err, self.commit_error = self.commit_error, None
            raise err
        assert not self.waiting, "commit with sends not yet answered"
        for topic, key, value, headers in self._txn:
            self.broker.append(topic, 0, key, value, headers)
        self.broker.commit(self._offsets)
        self._txn = None

    def abort_transaction(self) -> None:
        self.waiting.clear()
        self._txn = None

    def close(self, timeout_s: float) -> None:
        """kafka-python's close(0) and librdkafka's purge: what was not answered fails, nothing more goes out."""
        self.closed = True
        if timeout_s == 0:
            failed, self.waiting = self.waiting, []
            for *_message, on_done in failed:
                on_done(Retriable("the producer was closed"))


def fake_tokenize(texts: list[str]) -> Tokens:
    ids = [[101, *(sum(map(ord, word)) % 1000 + 1000 for word in text.split()[:30]), 102] for text in texts]
    return Tokens(ids=ids, truncated=[len(t.split()) > 30 for t in texts])


def fake_forward(ids) -> np.ndarray:
    return np.array([(sum(row) % 97) / 96 for row in ids])


class Harness:
    """The real Worker over fake Kafka, stepped by hand, with the invariants checked after each step."""

    def __init__(self, guarantee: str = "at-least-once", partitions: int = 2, forward=fake_forward,
                 tokenize=fake_tokenize, limits: dict[str, int] | None = None, **overrides) -> None:
        self.broker = Broker()
        self.kafka = FakeKafkaConsumer(self.broker, partitions)
        self.producers: list[FakeProducer] = []
        self.guarantee = guarantee
        self.config = WorkerConfig(**{"model": "fake", "input_topic": IN, "output_topic": OUT, "dlq_topic": DLQ,
                                      "guarantee": guarantee, "max_wait_ms": 0, "commit_interval_ms": 0,
                                      **overrides}).with_batch_caps(*BATCH_CAPS["cpu"], BATCH_OVERHEAD_TOKENS["cpu"])
        self.inference = InferenceStage(forward, [101, 102], self.config.max_device_failures)
        consumer = KafkaPythonConsumer(self.kafka)

        self.producer_failures = 0  # producers that cannot be made (the broker is away)

        def make_producer() -> FakeProducer:
            if self.producer_failures:
                self.producer_failures -= 1
                raise Retriable("no broker to initialise the producer with")
            producer = FakeProducer(self.broker, guarantee == "exactly-once")
            if self.producers:
                producer.refuse = self.producers[-1].refuse
            self.producers.append(producer)
            return producer

        def make_delivery(tracker, on_delivered):
            parts = (make_producer, consumer, tracker, DLQ, on_delivered, lambda: None)
            pacing = {"commit_interval_s": self.config.commit_interval_ms / 1000,
                      "max_message_bytes": (limits or {}).get}
            if guarantee == "exactly-once":
                return ExactlyOnce(*parts, **pacing, transaction_timeout_s=10, instance="fake")
            return AtLeastOnce(*parts, **pacing)

        self.now = 1_000.0
        delivery_module.clock = lambda: self.now  # backoffs pass as the steps go, not in real time
        self.worker = Worker(self.config, tokenize, "fake@0", self.inference, WorkerMetrics(), Health(), consumer,
                             make_delivery)
        self.worker.consumer.subscribe(IN)
        self.committed_seen: dict[TP, int] = {}
        self.commits_checked = 0

    @property
    def producer(self) -> FakeProducer:
        return self.producers[-1]

    def publish(self, partition: int, count: int, text: str = "a fine film") -> None:
        for _ in range(count):
            offset = len(self.broker.logs[(IN, partition)])
            value = f'{{"id": "p{partition}-{offset}", "text": "{text} {offset}"}}'
            self.broker.append(IN, partition, b"k", value.encode())

    def step(self, times: int = 1, answer: bool = True) -> None:
        """Run the loop; the tokenizer and the device finish what they were given before the next step; then
        check."""
        for _ in range(times):
            self.now += 1.0
            self.worker.step()
            self.tokens()
            while self.inference.busy:
                self.worker._take_scores(self.inference.collect(timeout=5))
            if answer:
                self.producer.answer()
            self.check()

    def tokens(self) -> None:
        """The tokenizer finishes what it was given (its thread), as a step would find it next time."""
        while self.worker.tokenizing.busy:
            self.worker._pool(self.worker.tokenizing.collect(timeout=5))

    def run_until_idle(self, limit: int = 200) -> None:
        for _ in range(limit):
            self.step()
            caught_up = all(self.kafka.positions.get(TopicPartition(IN, p), -1) == len(self.broker.logs[(IN, p)])
                            for p in range(self.kafka.partitions))
            if caught_up and not len(self.worker.tracker) and not self.worker.pool and not self.producer.waiting:
                self.step()
                self.check(idle=True)
                return
        raise AssertionError(f"not idle after {limit} steps: {len(self.worker.tracker)} records in hand")

    def check(self, idle: bool = False) -> None:
        """The delivery invariants of DESIGN.md, over everything visible on the fake broker. Order is checked
        once idle: while at-least-once publishes a rewound partition again, the last copies are not yet in order."""
        published = self.broker.published()
        by_partition: dict[int, list[int]] = defaultdict(list)
        by_output: dict[tuple[str, int], list[int]] = defaultdict(list)  # order holds within each output
        for item in published:
            by_partition[item["partition"]].append(item["offset"])
            by_output[(item["topic_out"], item["partition"])].append(item["offset"])
        for tp, position in self.broker.committed.items():
            missing = set(range(position)) - set(by_partition[tp.partition])
            assert not missing, f"committed {tp.partition}@{position} but never published {sorted(missing)[:10]}"
        for tp, position in self.broker.commit_history[self.commits_checked:]:
            assert position >= self.committed_seen.get(tp, 0), f"commit of {tp} moved back to {position}"
            self.committed_seen[tp] = position
        self.commits_checked = len(self.broker.commit_history)
        for (topic, partition), offsets in by_output.items() if idle else ():
            last = list(dict.fromkeys(reversed(offsets)))[::-1]  # the order of each offset's last copy
            assert last == sorted(last), f"partition {partition} published out of order to {topic}: {offsets}"
        for partition, offsets in by_partition.items():
            if self.guarantee == "exactly-once":
                assert len(offsets) == len(set(offsets)), f"partition {partition} published twice: {offsets}"

    def outcomes(self) -> dict[tuple[int, int], str]:
        """(partition, offset) -> label or error code, the last published."""
        return {(i["partition"], i["offset"]): i["body"].get("label") or i["body"]["error"]
                for i in self.broker.published()}

    def inputs(self) -> set[tuple[int, int]]:
        return {(p, m.offset) for (topic, p), log in self.broker.logs.items() if topic == IN for m in log}
