"""confluent-kafka (librdkafka, the `fast` extra) behind the worker's client seam.

librdkafka runs the rebalance callbacks inside `consume()` on the calling thread and, with the
eager assignors (range, roundrobin), drops the whole assignment on revoke: a partition assigned
again starts from the group's committed offset, and messages fetched under the old assignment are
purged by version barriers. So `poll` only turns the callbacks into `Polled` events and keeps
records of the current assignment; none of kafka-python's workarounds are needed. A record it
cannot decode arrives as a message with `error()` set (or with headers that do not decode) and is
handed over as unreadable, with its offset.

librdkafka answers sends only inside `poll()`/`flush()`: each producer serves its delivery reports
on a small thread of its own that calls `poll(0.05)` (it blocks in C, without the GIL, and wakes
at once for a report), so answers reach the delivery's queue as they come, whatever the loop does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from contract.cli import UserError
from contract.kafka import KafkaSettings, explain_connection_error
from worker.clients import TP, Polled, Record, Refusal
from worker.config import WorkerConfig

log = logging.getLogger(__name__)

ASSIGNORS = "range,roundrobin"  # kafka-python's default partition_assignment_strategy: one group, both clients
REJECTED = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_RECORD}
FENCED = {KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH, KafkaError._FENCED,
          KafkaError.TRANSACTION_COORDINATOR_FENCED}
UNREADABLE = {KafkaError._BAD_MSG, KafkaError._BAD_COMPRESSION, KafkaError._NOT_IMPLEMENTED,
              KafkaError.INVALID_MSG, KafkaError.INVALID_RECORD, KafkaError.UNSUPPORTED_COMPRESSION_TYPE}
SERVE_S = 0.05  # a producer's report thread waits this long per poll (it wakes at once for a report)
TOPIC_WAIT_S = 15.0
TRANSACTION_TIMEOUT_MS = 10_000
REQUEST_TIMEOUT_MS = 10_000  # as the kafka-python producer: a broker restart costs seconds, not a minute
DELIVERY_TIMEOUT_MS = 20_000
BATCH_BYTES = 1_000_000  # librdkafka's default, kept below the output topics' max.message.bytes


def _error(err: KafkaError) -> KafkaException:
    """librdkafka hands errors over as values; the seam passes exceptions."""
    return KafkaException(err)


def _code(err: Exception) -> int | None:
    inner = err.args[0] if isinstance(err, KafkaException) and err.args else None
    return inner.code() if isinstance(inner, KafkaError) else None


class ConfluentConsumer:
    def __init__(self, config: dict[str, Any], consumer_class: Callable[[dict[str, Any]], Any] = Consumer) -> None:
        self._commits: list[tuple[frozenset[tuple[str, int, int]], Callable[[Exception | None], None]]] = []
        self._fatal: KafkaError | None = None
        self._consumer = consumer_class({**config, "on_commit": self._on_commit, "error_cb": self._on_error})
        self._topic = ""
        self._revoked: set[TP] = set()
        self._assigned: set[TP] | None = None
        self._positions: Callable[[set[TP]], dict[TP, int]] | None = None

    @classmethod
    def connect(cls, settings: KafkaSettings, client_id: str, group: str, max_wait_ms: int,
                max_record_bytes: int, session_timeout_ms: int, instance_id: str | None) -> ConfluentConsumer:
        config = {
            **settings.librdkafka_config(client_id), "group.id": group, "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "isolation.level": "read_committed", "fetch.min.bytes": 1,
            "fetch.wait.max.ms": max(1, max_wait_ms), "max.partition.fetch.bytes": 2 * max_record_bytes,
            "queued.max.messages.kbytes": max(16_384, 4 * max_record_bytes // 1024),  # bounds prefetched memory
            "check.crcs": True, "partition.assignment.strategy": ASSIGNORS,
            "session.timeout.ms": session_timeout_ms,
            "heartbeat.interval.ms": max(100, min(3_000, session_timeout_ms // 3)),
        }
        if instance_id:
            config["group.instance.id"] = instance_id
        return cls(config)

    # -- group --------------------------------------------------------------------------------------

    def subscribe(self, topic: str) -> None:
        self._topic = topic
        self._consumer.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_lost)

    def before_revoke(self, positions: Callable[[set[TP]], dict[TP, int]]) -> None:
        self._positions = positions

    def _on_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:  # inside consume()
        """Still the owner: what `before_revoke` hands back is committed, synchronously, before they go."""
        revoked = {TP(tp.topic, tp.partition) for tp in partitions}
        offsets = self._positions(revoked) if self._positions else {}
        if offsets:
            try:
                self._consumer.commit(offsets=[TopicPartition(tp.topic, tp.partition, o) for tp, o in offsets.items()],
                                      asynchronous=False)
            except KafkaException as err:  # the partitions go anyway; their results may be redone
                log.info("commit before the revoke failed: %s", err)
        self._on_lost(_consumer, partitions)

    def _on_lost(self, _consumer: Any, partitions: list[TopicPartition]) -> None:  # no longer ours: note only
        self._revoked.update(TP(tp.topic, tp.partition) for tp in partitions)
        self._assigned = None

    def _on_assign(self, _consumer: Any, partitions: list[TopicPartition]) -> None:  # librdkafka assigns after it
        self._assigned = {TP(tp.topic, tp.partition) for tp in partitions}

    def rejoin(self) -> None:
        self._consumer.unsubscribe()
        self.subscribe(self._topic)

    def assignment(self) -> set[TP]:
        return {TP(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    # -- records ------------------------------------------------------------------------------------

    def poll(self, max_records: int, timeout_s: float) -> Polled:
        messages = self._consumer.consume(num_messages=max(1, max_records), timeout=max(0.0, timeout_s))
        if self._fatal is not None:
            raise UserError(f"the Kafka consumer stopped: {self._fatal.str()}")
        polled = Polled()
        if self._revoked:
            polled.revoked, self._revoked = self._revoked, set()
        if self._assigned is not None:
            polled.assigned, self._assigned = self._assigned, None
        owned = self.assignment() if polled.revoked or polled.assigned else None
        for message in messages:
            record = self._record(message)
            if record is not None and (owned is None or record.tp in owned):
                polled.records.append(record)
        return polled

    def _record(self, message: Any) -> Record | None:
        err = message.error()
        if err is not None:
            if message.partition() is None or message.offset() is None or message.offset() < 0 \
                    or err.code() not in UNREADABLE:
                self._on_error(err)  # not about one record: librdkafka retries by itself
                return None
            detail = f"the Kafka client cannot read this record ({err.name()}: {err.str()})"[:500]
            log.warning("partition %s:%d offset %d unreadable, dead-lettered: %s", message.topic(),
                        message.partition(), message.offset(), detail)
            return Record(TP(message.topic(), message.partition()), message.offset(), None, None, [], -1, detail)
        tp = TP(message.topic(), message.partition())
        try:
            return Record(tp, message.offset(), message.key(), message.value(), list(message.headers() or ()),
                          message.timestamp()[1])
        except (SystemError, UnicodeDecodeError):
            # a header name that is not UTF-8: confluent-kafka leaves a UnicodeDecodeError pending, which
            # surfaces at headers() or at the next call (seen: at Record(...)) as a SystemError
            detail = "the Kafka client cannot read this record (a header name that is not UTF-8)"
            return Record(tp, message.offset(), message.key(), message.value(), [], message.timestamp()[1], detail)

    def pause_all(self, paused: bool) -> None:
        assigned = self._consumer.assignment()
        if assigned:
            (self._consumer.pause if paused else self._consumer.resume)(assigned)

    def position(self, tp: TP) -> int | None:
        """librdkafka's application position: local, and past transaction markers."""
        [at] = self._consumer.position([TopicPartition(*tp)])
        return at.offset if at.offset >= 0 else None

    # -- commits ------------------------------------------------------------------------------------

    def commit(self, offsets: dict[TP, int], on_done: Callable[[Exception | None], None] | None = None) -> None:
        listed = [TopicPartition(tp.topic, tp.partition, o) for tp, o in offsets.items()]
        if on_done is None:
            for tp in self._consumer.commit(offsets=listed, asynchronous=False) or ():
                if tp.error is not None:
                    raise _error(tp.error)
            return
        pending = (frozenset((t.topic, t.partition, t.offset) for t in listed), on_done)
        self._commits.append(pending)
        try:
            self._consumer.commit(offsets=listed, asynchronous=True)
        except KafkaException as err:  # refused at once (no group coordinator state for it): a failed commit
            self._commits.remove(pending)
            on_done(err)

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """The answer to an asynchronous commit (inside consume()), matched to its request by its offsets."""
        key = frozenset((t.topic, t.partition, t.offset) for t in partitions)
        for i, (offsets, on_done) in enumerate(self._commits):
            if offsets == key:
                del self._commits[i]
                failed = err or next((t.error for t in partitions if t.error is not None), None)
                on_done(None if failed is None else _error(failed))
                return

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = err
        log.debug("Kafka consumer: %s", err.str())

    def group_metadata(self) -> Any:
        return self._consumer.consumer_group_metadata()

    def close(self) -> None:
        """Leaves the group (a dynamic member), so that its partitions move at once."""
        self._consumer.close()


class ConfluentProducer:
    def __init__(self, config: dict[str, Any], transactional: bool) -> None:
        self._producer = Producer({**config, "error_cb": self._on_error})
        if transactional:
            self._producer.init_transactions(TRANSACTION_TIMEOUT_MS / 1000)  # fences older producers of the id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="producer-reports", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(SERVE_S)

    @staticmethod
    def _on_error(err: KafkaError) -> None:
        log.debug("Kafka producer: %s", err.str())

    def send(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]],
             on_done: Callable[[Exception | None], None]) -> Exception | None:
        try:
            self._producer.produce(topic, value, key, headers=headers,
                                   on_delivery=lambda err, _msg: on_done(None if err is None else _error(err)))
        except (KafkaException, BufferError) as err:  # larger than message.max.bytes, a full queue, a bad state
            on_done(err)
            return err
        return None

    def refusal(self, err: Exception) -> Refusal:
        code = _code(err)
        if code in REJECTED:
            return Refusal.REJECTED
        if code in FENCED:
            return Refusal.FENCED
        return Refusal.RETRY

    def flush(self, timeout_s: float) -> None:
        self._producer.flush(timeout_s)

    def begin_transaction(self) -> None:
        self._producer.begin_transaction()

    def send_offsets_to_transaction(self, offsets: dict[TP, int], group_metadata: Any) -> None:
        self._producer.send_offsets_to_transaction(
            [TopicPartition(tp.topic, tp.partition, o) for tp, o in offsets.items()], group_metadata,
            TRANSACTION_TIMEOUT_MS / 1000)

    def commit_transaction(self) -> None:
        self._producer.commit_transaction(TRANSACTION_TIMEOUT_MS / 1000)

    def abort_transaction(self) -> None:
        self._producer.abort_transaction(TRANSACTION_TIMEOUT_MS / 1000)

    def close(self, timeout_s: float) -> None:
        """`timeout_s` 0: at once, what is in flight fails (the delivery no longer counts those answers)."""
        if timeout_s > 0:
            self._producer.flush(timeout_s)
        self._stop.set()
        self._thread.join()
        self._producer.purge(in_queue=True, in_flight=True, blocking=False)
        self._producer.poll(0)


def connect(config: WorkerConfig, settings: KafkaSettings, max_message_bytes: Callable[[str], int | None]
            ) -> tuple[ConfluentConsumer, Callable[[], ConfluentProducer]]:
    """The consumer and a producer factory, as `worker.__main__.connect` for kafka-python; a missing topic
    or an unreachable broker ends here in one line."""
    client_id = f"sentiment-worker-{config.group}"
    base = settings.librdkafka_config(client_id)
    exactly_once = config.guarantee == "exactly-once"

    def make_producer() -> ConfluentProducer:
        smallest = min(max_message_bytes(t) or BATCH_BYTES for t in (config.output_topic, config.dlq_topic))
        return ConfluentProducer({
            **base, "acks": "all", "enable.idempotence": True, "linger.ms": 2,
            "batch.size": max(1024, min(BATCH_BYTES, smallest - 512)),
            "request.timeout.ms": REQUEST_TIMEOUT_MS,
            "delivery.timeout.ms": TRANSACTION_TIMEOUT_MS if exactly_once else DELIVERY_TIMEOUT_MS,  # librdkafka: <=
            "message.max.bytes": max(1 << 20, 2 * config.max_record_bytes),
            **({"transactional.id": config.transactional_id, "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS}
               if exactly_once else {})}, exactly_once)

    probe = Producer({**base, "error_cb": lambda _err: None})
    try:
        for topic in (config.input_topic, config.output_topic, config.dlq_topic):
            found = probe.list_topics(topic, timeout=TOPIC_WAIT_S).topics.get(topic)  # auto-creates where allowed
            if found is None or (found.error is not None and found.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
                raise UserError(f"topic {topic!r} does not exist and the broker does not create topics; "
                                "create it first")
    except KafkaException as err:
        raise explain_connection_error(settings, err) from None
    consumer = ConfluentConsumer.connect(settings, client_id, config.group, config.max_wait_ms, config.max_record_bytes,
                                         config.session_timeout_ms,
                                         config.instance_id if config.static_membership else None)
    return consumer, make_producer
