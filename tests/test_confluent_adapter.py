"""The confluent-kafka adapter (worker/confluent.py) over a fake librdkafka consumer, no broker: its
rebalance callbacks become `Polled` events, records it cannot read become unreadable records,
asynchronous commits are answered, producer errors are classified; and the real `Worker` runs over
it step by step with the delivery invariants of tests/fakes.py checked after every step."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("confluent_kafka", reason="the `fast` extra (confluent-kafka) is not installed")

from confluent_kafka import KafkaError, KafkaException, TopicPartition  # noqa: E402

from contract.cli import UserError  # noqa: E402
from contract.kafka import CONNECT_TIMEOUT_MS, KafkaSettings  # noqa: E402
from tests.fakes import IN, Broker, Harness  # noqa: E402
from worker.clients import TP, Refusal  # noqa: E402
from worker.confluent import ConfluentConsumer, ConfluentProducer  # noqa: E402

GUARANTEES = ["at-least-once", "exactly-once"]


class Message:
    """confluent_kafka.Message's read side."""

    def __init__(self, topic, partition, offset, key=None, value=None, headers=None, error=None, bad_headers=False):
        self._topic, self._partition, self._offset = topic, partition, offset
        self._key, self._value, self._headers, self._error, self._bad = key, value, headers, error, bad_headers

    def topic(self):
        return self._topic

    def partition(self):
        return self._partition

    def offset(self):
        return self._offset

    def key(self):
        return self._key

    def value(self):
        return self._value

    def headers(self):
        if self._bad:  # what confluent-kafka does for a header name that is not UTF-8
            raise SystemError("<method 'headers' of 'confluent_kafka.cimpl.Message' objects> returned a result "
                              "with an exception set")
        return self._headers

    def error(self):
        return self._error

    def timestamp(self):
        return (1, 1_000)


class FakeConsumer:
    """librdkafka's high-level consumer as the adapter sees it: eager rebalances whose callbacks run inside
    `consume()`; a revoke drops the assignment and an assign starts each partition at its committed offset
    (messages of the old assignment are purged, as librdkafka's version barriers do, unless `stale` asks for
    them); asynchronous commits are answered through `on_commit` in a later `consume()`."""

    def __init__(self, broker: Broker, partitions: int, config: dict) -> None:
        self.broker, self.partitions, self.config = broker, partitions, config
        self.callbacks: dict = {}
        self._assignment: list[int] = []
        self._paused: set[int] = set()
        self.positions: dict[TP, int] = {}
        self._script: list[tuple[set[int], bool, bool, bool]] = []
        self._pending_assign: set[int] | None = None
        self._answers: list[tuple] = []
        self.commit_error: KafkaError | None = None
        self.injected: list[Message] = []  # returned by the next consume()
        self.closed = False

    def rebalance(self, partitions: set[int], same_poll: bool = True, lost: bool = False, stale: bool = False):
        self._script.append((partitions, same_poll, lost, stale))

    # confluent_kafka.Consumer
    def subscribe(self, topics, on_assign=None, on_revoke=None, on_lost=None) -> None:
        self.callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}
        self.rebalance(set(range(self.partitions)))

    def unsubscribe(self) -> None:
        self._assignment = []

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        for err, partitions in self._answers:
            self.config["on_commit"](err, partitions)
        self._answers = []
        out, self.injected = self.injected, []
        if self._pending_assign is not None:
            self._assign(self._pending_assign)
            self._pending_assign = None
        elif self._script:
            partitions, same_poll, lost, stale = self._script.pop(0)
            before = self._fetch(num_messages) if stale else []
            self.callbacks["lost" if lost else "revoke"](self, [TopicPartition(IN, p) for p in self._assignment])
            self._assignment, self._paused = [], set()
            if not same_poll:
                self._pending_assign = partitions
                return out + before
            self._assign(partitions)
            out += before
        return out + self._fetch(num_messages - len(out))

    def _assign(self, partitions: set[int]) -> None:
        self.callbacks["assign"](self, [TopicPartition(IN, p) for p in sorted(partitions)])
        self._assignment = sorted(partitions)
        for p in partitions:
            self.positions[TP(IN, p)] = self.broker.committed.get(TP(IN, p), 0)

    def _fetch(self, count: int) -> list[Message]:
        out = []
        for p in self._assignment:
            if p in self._paused or count <= 0:
                continue
            tp = TP(IN, p)
            chunk = self.broker.logs[(IN, p)][self.positions[tp]: self.positions[tp] + count]
            out += [Message(IN, p, m.offset, m.key, m.value, m.headers) for m in chunk]
            self.positions[tp] += len(chunk)
            count -= len(chunk)
        return out

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(IN, p) for p in self._assignment]

    def pause(self, tps) -> None:
        self._paused |= {tp.partition for tp in tps}

    def resume(self, tps) -> None:
        self._paused -= {tp.partition for tp in tps}

    def position(self, tps) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.positions.get(TP(tp.topic, tp.partition), -1001))
                for tp in tps]

    def committed(self, tps, timeout=None) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.broker.committed.get(TP(tp.topic, tp.partition), -1001))
                for tp in tps]

    def seek(self, tp) -> None:
        self.positions[TP(tp.topic, tp.partition)] = max(0, tp.offset)

    def commit(self, offsets=None, asynchronous=True):
        if self.commit_error is None:
            self.broker.commit({TP(tp.topic, tp.partition): tp.offset for tp in offsets})
        if asynchronous:
            self._answers.append((self.commit_error, offsets))
            self.commit_error = None
            return None
        return offsets

    def consumer_group_metadata(self) -> str:
        return "group-metadata"

    def close(self) -> None:
        self.closed = True


def adapter(partitions: int = 2) -> tuple[ConfluentConsumer, FakeConsumer, Broker]:
    broker = Broker()
    made: list[FakeConsumer] = []
    consumer = ConfluentConsumer({"group.id": "g"}, lambda config: made.append(FakeConsumer(broker, partitions, config))
                                 or made[0])
    consumer.subscribe(IN)
    return consumer, made[0], broker


def publish(broker: Broker, partition: int, count: int) -> None:
    for _ in range(count):
        offset = len(broker.logs[(IN, partition)])
        broker.append(IN, partition, b"k", f'{{"id": "p{partition}-{offset}", "text": "a fine film"}}'.encode())


# -- the adapter alone ---------------------------------------------------------------------------------


def test_callbacks_become_events_and_records_continue_from_the_committed_offset():
    consumer, fake, broker = adapter()
    publish(broker, 0, 5)
    publish(broker, 1, 3)
    polled = consumer.poll(100, 0)
    assert polled.assigned == {TP(IN, 0), TP(IN, 1)} and not polled.revoked
    assert [(r.tp.partition, r.offset) for r in polled.records] == [(0, o) for o in range(5)] + [(1, o) for o in
                                                                                                  range(3)]
    assert consumer.position(TP(IN, 0)) == 5
    broker.commit({TP(IN, 0): 2})
    fake.rebalance({0}, same_poll=False)
    polled = consumer.poll(100, 0)
    assert polled.revoked == {TP(IN, 0), TP(IN, 1)} and not polled.assigned and not polled.records
    assert consumer.assignment() == set()
    polled = consumer.poll(100, 0)
    assert polled.assigned == {TP(IN, 0)} and not polled.revoked
    assert [r.offset for r in polled.records] == [2, 3, 4]


def test_records_of_partitions_no_longer_assigned_are_dropped():
    """Had librdkafka returned messages fetched before a revoke in the same consume(), none of a partition
    that is not assigned now may reach the worker."""
    consumer, fake, broker = adapter()
    publish(broker, 0, 4)
    publish(broker, 1, 4)
    consumer.poll(1, 0)  # assigned, one record
    fake.rebalance({1}, stale=True)
    polled = consumer.poll(100, 0)
    assert polled.revoked == {TP(IN, 0), TP(IN, 1)} and polled.assigned == {TP(IN, 1)}
    assert {r.tp for r in polled.records} == {TP(IN, 1)}


def test_lost_partitions_are_reported_as_revoked():
    consumer, fake, _ = adapter()
    consumer.poll(10, 0)
    fake.rebalance({1}, lost=True)
    polled = consumer.poll(10, 0)
    assert polled.revoked == {TP(IN, 0), TP(IN, 1)} and polled.assigned == {TP(IN, 1)}


def test_records_it_cannot_read_are_handed_over_as_unreadable():
    consumer, fake, broker = adapter(1)
    publish(broker, 0, 1)
    consumer.poll(10, 0)
    fake.injected = [Message(IN, 0, 1, error=KafkaError(KafkaError._BAD_MSG, "failed CRC32 check")),
                     Message(IN, 0, 2, b"k", b"v", bad_headers=True),
                     Message(None, None, -1001, error=KafkaError(KafkaError._TRANSPORT, "broker down")),
                     Message(IN, 0, 3, b"k", b'{"text": "ok"}', [("h", b"v"), ("n", None)])]
    records = consumer.poll(10, 0).records
    assert [(r.offset, r.unreadable is not None) for r in records] == [(1, True), (2, True), (3, False)]
    assert "_BAD_MSG" in records[0].unreadable and records[1].value == b"v"
    assert records[2].headers == [("h", b"v"), ("n", None)]


def test_a_fatal_consumer_error_ends_in_one_line():
    consumer, fake, _ = adapter(1)
    fake.config["error_cb"](KafkaError(KafkaError.FENCED_INSTANCE_ID, "another member uses it", fatal=True))
    with pytest.raises(UserError, match="consumer stopped"):
        consumer.poll(10, 0)


def test_asynchronous_commits_are_answered_and_failures_reported():
    consumer, fake, broker = adapter()
    consumer.poll(10, 0)
    answers: list = []
    consumer.commit({TP(IN, 0): 3}, answers.append)
    fake.commit_error = KafkaError(KafkaError.REBALANCE_IN_PROGRESS)
    consumer.commit({TP(IN, 1): 4}, answers.append)
    assert answers == []  # answers come inside consume(), on the polling thread
    consumer.poll(10, 0)
    assert answers[0] is None and isinstance(answers[1], KafkaException)
    assert broker.committed == {TP(IN, 0): 3}
    consumer.commit({TP(IN, 1): 4})  # synchronous
    assert broker.committed[TP(IN, 1)] == 4


def test_position_and_pause():
    consumer, fake, broker = adapter(1)
    assert consumer.position(TP(IN, 0)) is None  # not assigned yet: unknown, no I/O
    publish(broker, 0, 6)
    assert [r.offset for r in consumer.poll(3, 0).records] == [0, 1, 2]
    consumer.pause_all(True)
    assert consumer.poll(10, 0).records == []
    consumer.pause_all(False)
    assert [r.offset for r in consumer.poll(10, 0).records] == [3, 4, 5]
    assert consumer.group_metadata() == "group-metadata"


def test_settings_become_librdkafka_keys():
    plain = KafkaSettings(bootstrap_servers="a:1,b:2").librdkafka_config("me")
    assert plain["bootstrap.servers"] == "a:1,b:2" and plain["client.id"] == "me"
    assert plain["security.protocol"] == "PLAINTEXT" and "sasl.username" not in plain
    assert plain["socket.connection.setup.timeout.ms"] == str(CONNECT_TIMEOUT_MS)
    sasl = KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512", sasl_username="u",
                         sasl_password="p").librdkafka_config("me")
    assert (sasl["sasl.mechanisms"], sasl["sasl.username"], sasl["sasl.password"]) == ("SCRAM-SHA-512", "u", "p")


# -- the producer without a broker ---------------------------------------------------------------------


def test_producer_answers_arrive_without_being_polled_and_errors_are_classified():
    """Delivery reports are served by the producer's own thread: an answer comes while nobody calls poll or
    flush (here the broker is unreachable, so it is a timeout: retried)."""
    producer = ConfluentProducer({"bootstrap.servers": "127.0.0.1:1", "message.timeout.ms": 300}, False)
    answered = threading.Event()
    errors: list = []
    producer.send("out", b"k", b"v", [("h", b"")], lambda err: (errors.append(err), answered.set()))
    assert answered.wait(10), "no delivery report without a poll"
    assert isinstance(errors[0], KafkaException) and producer.refusal(errors[0]) is Refusal.RETRY
    for code, refusal in ((KafkaError.MSG_SIZE_TOO_LARGE, Refusal.REJECTED),
                          (KafkaError.RECORD_LIST_TOO_LARGE, Refusal.REJECTED),
                          (KafkaError.INVALID_RECORD, Refusal.REJECTED),
                          (KafkaError.PRODUCER_FENCED, Refusal.FENCED), (KafkaError._FENCED, Refusal.FENCED),
                          (KafkaError.INVALID_PRODUCER_EPOCH, Refusal.FENCED),
                          (KafkaError.NOT_ENOUGH_REPLICAS, Refusal.RETRY), (KafkaError._MSG_TIMED_OUT, Refusal.RETRY),
                          (KafkaError.UNKNOWN_TOPIC_OR_PART, Refusal.RETRY)):
        assert producer.refusal(KafkaException(KafkaError(code))) is refusal, code
    assert producer.refusal(BufferError("queue full")) is Refusal.RETRY
    started = time.monotonic()
    producer.send("out", None, b"v", [], lambda err: None)
    producer.close(timeout_s=0)
    assert time.monotonic() - started < 2


# -- the real Worker over the adapter ------------------------------------------------------------------


class ConfluentHarness(Harness):
    """tests/fakes.py's harness with the confluent adapter (over FakeConsumer) in place of kafka-python's."""

    def __init__(self, guarantee: str, partitions: int = 2, **overrides) -> None:
        super().__init__(guarantee, partitions, **overrides)
        made: list[FakeConsumer] = []
        consumer = ConfluentConsumer({}, lambda config: made.append(FakeConsumer(self.broker, partitions, config))
                                     or made[0])
        self.kafka = made[0]
        self.worker.consumer = self.worker.delivery.consumer = consumer
        consumer.before_revoke(self.worker._before_revoke)  # as Worker.__init__ does for its own consumer
        consumer.subscribe(IN)


def everything_classified(h: Harness) -> None:
    assert set(h.outcomes()) == h.inputs()
    for partition in range(h.kafka.partitions):
        end = len(h.broker.logs[(IN, partition)])
        if end:
            assert h.broker.committed[TP(IN, partition)] == end


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_the_worker_over_the_adapter_classifies_a_backlog(guarantee):
    h = ConfluentHarness(guarantee, max_batch_size=8, max_in_flight=32)
    publish(h.broker, 0, 60)
    publish(h.broker, 1, 45)
    h.run_until_idle()
    everything_classified(h)


@pytest.mark.parametrize("guarantee", GUARANTEES)
@pytest.mark.parametrize("same_poll", [True, False])
def test_the_worker_over_the_adapter_through_rebalances(guarantee, same_poll):
    """Revoke and assign in one consume() and in two, with results in flight and a partition taken away and
    given back: nothing committed unpublished, no commit backwards, order kept, no duplicate under
    exactly-once (checked after every step)."""
    h = ConfluentHarness(guarantee, max_batch_size=8, max_in_flight=64)
    publish(h.broker, 0, 200)
    publish(h.broker, 1, 200)
    h.step(3, answer=False)
    h.kafka.rebalance({0, 1}, same_poll=same_poll)
    h.step(2, answer=False)
    h.kafka.rebalance({1}, same_poll=same_poll, stale=True)
    h.step(3)
    h.kafka.rebalance({0, 1}, same_poll=same_poll, lost=True)
    h.run_until_idle()
    everything_classified(h)


def test_the_worker_dead_letters_what_the_adapter_cannot_read():
    h = ConfluentHarness("at-least-once", partitions=1)
    publish(h.broker, 0, 3)
    h.step(2)
    h.broker.append(IN, 0, b"k", b"unreadable")  # offsets 3 and 4: what the client reports about them
    h.broker.append(IN, 0, b"k", b"bad header")
    publish(h.broker, 0, 2)
    h.kafka.positions[TP(IN, 0)] = 5
    h.kafka.injected = [Message(IN, 0, 3, error=KafkaError(KafkaError._BAD_MSG, "failed CRC32 check")),
                        Message(IN, 0, 4, b"k", b"bad header", bad_headers=True)]
    h.run_until_idle()
    everything_classified(h)
    outcomes = h.outcomes()
    assert outcomes[(0, 3)] == outcomes[(0, 4)] == "internal_error"


@pytest.mark.parametrize("same_poll", [True, False])
def test_the_worker_over_the_adapter_commits_what_was_acknowledged_before_a_revoke(same_poll):
    """on_revoke commits, synchronously and still the owner, what was acknowledged since the last (paced)
    commit, and nothing past a result not yet acknowledged; the next assignment goes on from there."""
    h = ConfluentHarness("at-least-once", max_batch_size=8, max_in_flight=64, commit_interval_ms=3_600_000)
    publish(h.broker, 0, 20)
    publish(h.broker, 1, 12)
    for _ in range(30):
        h.step()
        if len(h.broker.published()) == 32 and not h.producer.waiting:
            break
    assert len(h.broker.published()) == 32 and not h.broker.committed  # acknowledged, no paced commit yet
    publish(h.broker, 0, 4)  # offsets 20..23: sent, not answered, when the revoke comes
    h.step(3, answer=False)
    assert h.producer.waiting
    h.kafka.rebalance({0, 1}, same_poll=same_poll)
    h.step(answer=False)
    assert h.broker.committed == {TP(IN, 0): 20, TP(IN, 1): 12}
    h.step(20)  # (the paced commit never comes: these stay in hand)
    offsets = [(item["partition"], item["offset"]) for item in h.broker.published()]
    assert sorted(set(offsets)) == sorted(h.inputs())
    assert len(offsets) - len(set(offsets)) <= 4  # only the unanswered ones may go out again
