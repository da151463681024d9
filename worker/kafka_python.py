"""kafka-python (pure Python) behind the worker's client seam, with the workarounds this client needs.

kafka-python 3.0 runs rebalance listeners on its I/O thread, where blocking calls are forbidden (an
async listener may await the coordinator's own commit: acknowledged offsets go out before a revoke),
and keeps the fetch position of a partition that stays assigned across an eager rebalance, so
records of the poll that completes a rebalance may come from that old, further-ahead position.
`poll` therefore drops the records of that poll for the assigned partitions and gives each a
fresh state, so the client fetches its committed offset inside the next polls, within their
timeouts (no call here blocks on the broker), and reports the events to the main thread. It
also rides out a broker that is away (a retriable error ends the poll, empty), rejoins the group
when it was left with an empty assignment (seen right after start), and steps past records it
cannot decode.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kafka import AsyncConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka import errors as kerr
from kafka.admin import ConfigResource
from kafka.consumer.subscription_state import TopicPartitionState
from kafka.partitioner.sticky import StickyPartitioner
from kafka.structs import OffsetAndMetadata

from contract.kafka import KafkaSettings
from worker.clients import TP, Polled, Record, Refusal

log = logging.getLogger(__name__)

REJOIN_AFTER_S = 10.0
MAX_REJOINS = 3
PROBE_S = 5.0
REVOKE_COMMIT_MS = 5_000
POLL_FAILING_LIMIT_S = 300.0
BATCH_BYTES = 262_144  # a partition's round of results in one batch (kafka-python's 16 KiB default split it in
#                        four: 20 % fewer records/s)
UNKNOWN_LIMIT = 16_384 + 512  # a topic's max.message.bytes not known yet: batches of kafka-python's default size
REJECTED = (kerr.MessageSizeTooLargeError, kerr.RecordListTooLargeError, kerr.InvalidRecordError)
FENCED = (kerr.ProducerFencedError, kerr.InvalidProducerEpochError, kerr.TransactionCoordinatorFencedError)


class KafkaPythonConsumer:
    def __init__(self, consumer: KafkaConsumer) -> None:
        self._consumer = consumer
        self._topic = ""
        self._revoked: set[TP] = set()
        self._assigned: set[TP] | None = None
        self._last_event = time.monotonic()
        self._rejoins = 0
        self._positions: Callable[[set[TP]], dict[TP, int]] | None = None
        self._failing_since: float | None = None  # polls end with a retriable error (the broker is away)

    @classmethod
    def connect(cls, settings: KafkaSettings, client_id: str, group: str, max_wait_ms: int, max_poll_records: int,
                max_record_bytes: int, session_timeout_ms: int, instance_id: str | None) -> KafkaPythonConsumer:
        return cls(KafkaConsumer(
            **settings.client_config(client_id), group_id=group, enable_auto_commit=False,
            auto_offset_reset="earliest", isolation_level="read_committed", fetch_min_bytes=1,
            fetch_max_wait_ms=max(1, max_wait_ms), max_poll_records=max_poll_records,
            max_partition_fetch_bytes=2 * max_record_bytes, session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(100, min(3_000, session_timeout_ms // 3)), group_instance_id=instance_id,
            metadata_max_age_ms=5_000))  # a join that saw no partitions (seen: empty assignment) is retried soon

    # -- group --------------------------------------------------------------------------------------

    def subscribe(self, topic: str) -> None:
        self._topic = topic
        self._consumer.subscribe([topic], listener=_Listener(self))
        self._last_event = time.monotonic()

    def _on_revoked(self, partitions: list[TopicPartition]) -> None:  # I/O thread: take note only
        self._revoked.update(TP(tp.topic, tp.partition) for tp in partitions)
        self._assigned = None
        self._last_event = time.monotonic()

    def before_revoke(self, positions: Callable[[set[TP]], dict[TP, int]]) -> None:
        self._positions = positions

    async def _commit_before_revoke(self, partitions: list[TopicPartition]) -> None:  # I/O thread: awaits only
        offsets = self._positions({TP(tp.topic, tp.partition) for tp in partitions}) if self._positions else {}
        if not offsets:
            return
        try:
            await self._consumer._coordinator._commit_offsets_sync_async(
                {TopicPartition(*tp): OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()},
                timeout_ms=REVOKE_COMMIT_MS)
        except Exception as err:  # noqa: BLE001 - the partitions go anyway; their results may be redone
            log.info("commit before the revoke failed (%s: %s)", type(err).__name__, err)

    def _on_assigned(self, partitions: list[TopicPartition]) -> None:  # I/O thread: take note only
        self._assigned = {TP(tp.topic, tp.partition) for tp in partitions}
        self._last_event = time.monotonic()

    def rejoin(self) -> None:
        self._consumer.unsubscribe()
        self.subscribe(self._topic)

    def _rejoin_if_left_out(self) -> None:
        """An empty assignment that stays empty while the topic has partitions: rejoin, a few times, at
        growing intervals (an idle extra worker is left alone afterwards)."""
        if self._consumer.assignment() or self._rejoins >= MAX_REJOINS:
            return
        if time.monotonic() - self._last_event < REJOIN_AFTER_S * 2**self._rejoins:
            return
        if self._consumer.partitions_for_topic(self._topic):
            self._rejoins += 1
            log.warning("no partitions assigned although %s has some; rejoining the group (%d/%d)",
                        self._topic, self._rejoins, MAX_REJOINS)
            self.rejoin()

    def assignment(self) -> set[TP]:
        return {TP(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    # -- records ------------------------------------------------------------------------------------

    def poll(self, max_records: int, timeout_s: float) -> Polled:
        """Records and the events of this poll's listeners. A retriable error (the broker is away) ends the
        poll without records but with its events: the group has moved on, so must the worker."""
        try:
            polled = self._poll(max_records, timeout_s)
        except kerr.KafkaError as err:
            if not err.retriable:
                raise
            self._failed(err)
            return self._events({})
        self._recovered()
        return polled

    def _poll(self, max_records: int, timeout_s: float) -> Polled:
        try:
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max(1, max_records))
            if not self._revoked and self._assigned is None:
                self._rejoin_if_left_out()
        except (kerr.CorruptRecordError, kerr.UnsupportedCodecError, UnicodeDecodeError, ValueError) as err:
            self._drop_broken_fetch()
            unreadable = self._step_past_unreadable(err)
            polled = self._events({})
            polled.records = [r for r in unreadable if r.tp not in polled.assigned]
            return polled
        return self._events(batches)

    def _events(self, batches: dict[TopicPartition, list[Any]]) -> Polled:
        """Hands over the listeners' events once, with the records that still count (none of a partition just
        assigned: they may come from the position it kept)."""
        polled = Polled()
        if self._revoked:
            polled.revoked, self._revoked = self._revoked, set()
        if self._assigned is not None:
            polled.assigned, self._assigned = self._assigned, None
        if polled.revoked or polled.assigned:  # records fetched before the rebalance completed are fetched again
            keep = self._consumer.assignment()
            batches = {tp: rs for tp, rs in batches.items()
                       if tp in keep and TP(tp.topic, tp.partition) not in polled.assigned}
            self._restart_from_committed(polled.assigned)
        for ktp, rs in batches.items():
            tp = TP(ktp.topic, ktp.partition)
            polled.records.extend([Record(tp, r.offset, r.key, r.value, r.headers or [], r.timestamp) for r in rs])
        return polled

    def _restart_from_committed(self, tps: set[TP]) -> None:
        """A fresh state has no position: the client fetches the committed offset itself (the beginning when
        none) before it fetches records again. Its cached committed-offset requests predate this assignment:
        one left behind by a timed-out poll would be reused when the same partitions come back."""
        subscription = self._consumer._subscription
        with subscription._lock:
            for tp in map(TopicPartition._make, tps):
                if tp in subscription.assignment:
                    subscription.assignment[tp] = TopicPartitionState()
        self._consumer._coordinator._offset_fetch_futures.clear()

    def _failed(self, err: kerr.KafkaError) -> None:
        """Retried for up to POLL_FAILING_LIMIT_S in a row; then the error ends the worker (its replacement
        starts clean), rather than a worker that looks alive and polls nothing."""
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning("polling fails (%s: %s); retrying", type(err).__name__, err)
        elif time.monotonic() - self._failing_since > POLL_FAILING_LIMIT_S:
            raise err

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.info("polling works again after %.1f s", time.monotonic() - self._failing_since)
            self._failing_since = None

    def pause_all(self, paused: bool) -> None:
        assigned = list(self._consumer.assignment())
        if paused:
            self._consumer.pause(*assigned)
        else:
            self._consumer.resume(*assigned)

    def position(self, tp: TP) -> int | None:
        """No I/O, unlike KafkaConsumer.position(); None for a partition the client no longer holds."""
        subscription = self._consumer._subscription
        with subscription._lock:
            state = subscription.assignment.get(TopicPartition(*tp))
            return state.position.offset if state is not None and state.has_valid_position else None

    def _step_past_unreadable(self, err: Exception) -> list[Record]:
        """The client cannot decode a batch (bad CRC, a header name that is not UTF-8, an unknown codec) and
        raises on every poll: find the partition, then the first readable offset after it, and hand the
        offsets in between over as unreadable records, so that each ends as a dead letter."""
        assigned = self._consumer.assignment()
        paused = set(self._consumer.paused())
        try:
            for ktp in assigned - paused:
                start = self.position(TP(ktp.topic, ktp.partition))
                if start is None or self._reads(ktp, start, assigned):
                    continue
                end = self._consumer.end_offsets([ktp])[ktp]
                low, step = start, 1  # gallop to a readable offset, then bisect back to the first one
                while low + step < end and not self._reads(ktp, low + step, assigned):
                    low, step = low + step, step * 2
                high = min(end, low + step)
                while high - low > 1:
                    middle = (low + high) // 2
                    if self._reads(ktp, middle, assigned):
                        high = middle
                    else:
                        low = middle
                self._consumer.seek(ktp, high)
                detail = f"the Kafka client cannot read this record ({type(err).__name__}: {err})"[:500]
                log.warning("partition %s:%d offsets %d..%d unreadable, dead-lettered: %s",
                            ktp.topic, ktp.partition, start, high - 1, detail)
                return [Record(TP(ktp.topic, ktp.partition), o, None, None, [], -1, detail) for o in range(start, high)]
        finally:
            self._consumer.pause(*paused)
            self._consumer.resume(*(assigned - paused))
        raise err

    def _reads(self, ktp: TopicPartition, offset: int, assigned: set[TopicPartition]) -> bool:
        """Whether polling `ktp` alone from `offset` returns records (or nothing, at the end) without raising."""
        self._consumer.pause(*(assigned - {ktp}))
        self._consumer.resume(ktp)
        self._consumer.seek(ktp, offset)
        deadline = time.monotonic() + PROBE_S
        while time.monotonic() < deadline:
            try:
                if self._consumer.poll(timeout_ms=200, max_records=1):
                    self._consumer.seek(ktp, offset)
                    return True
            except (kerr.CorruptRecordError, kerr.UnsupportedCodecError, UnicodeDecodeError, ValueError):
                self._drop_broken_fetch()
                return False
        self._consumer.seek(ktp, offset)
        return True

    def _drop_broken_fetch(self) -> None:
        """kafka-python 3.0 keeps the fetched records whose decoding raised, their iterator spent but not drained:
        its next poll from that position then spins forever. Drain them, so the partition is fetched anew."""
        fetcher = self._consumer._fetcher
        if fetcher._next_partition_records is not None:
            fetcher._next_partition_records.drain()
            fetcher._next_partition_records = None

    # -- commits ------------------------------------------------------------------------------------

    def commit(self, offsets: dict[TP, int], on_done: Callable[[Exception | None], None] | None = None) -> None:
        kafka_offsets = {TopicPartition(*tp): OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}
        if on_done is None:
            self._consumer.commit(kafka_offsets)
            return
        self._consumer.commit_async(
            kafka_offsets, callback=lambda _offsets, result: on_done(result if isinstance(result, Exception) else None))

    def group_metadata(self) -> Any:
        return self._consumer.group_metadata()

    def close(self) -> None:
        """Leaves the group (a dynamic member), so that its partitions move at once."""
        self._consumer.close()


class _Listener(AsyncConsumerRebalanceListener):
    def __init__(self, consumer: KafkaPythonConsumer) -> None:
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.consumer._on_revoked(list(revoked))
        await self.consumer._commit_before_revoke(list(revoked))

    async def on_partitions_lost(self, lost: list[TopicPartition]) -> None:  # no longer ours: nothing to commit
        self.consumer._on_revoked(list(lost))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.consumer._on_assigned(list(assigned))


def producer_throughput(max_message_bytes: Sequence[int | None] = ()) -> dict[str, Any]:
    """How the worker's producer (and the pipeline benchmark's loop) batches: acknowledged by every replica,
    2 ms linger, batches up to BATCH_BYTES kept below the smallest of the output topics' max.message.bytes,
    keyless messages on one partition per batch (KIP-480, as the Java client and librdkafka do)."""
    smallest = min((limit or UNKNOWN_LIMIT for limit in max_message_bytes), default=BATCH_BYTES + 512)
    return {"acks": "all", "linger_ms": 2, "batch_size": max(1024, min(BATCH_BYTES, smallest - 512)),
            "partitioner": StickyPartitioner()}


class KafkaPythonProducer:
    def __init__(self, producer: KafkaProducer, transactional: bool) -> None:
        self._producer = producer
        if transactional:
            try:
                producer.init_transactions()  # fences any older producer of the same transactional id
            except BaseException:
                self.close(timeout_s=0)  # else its I/O thread lives on, one per try while the broker is away
                raise

    def send(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]],
             on_done: Callable[[Exception | None], None]) -> Exception | None:
        try:
            future = self._producer.send(topic, key=key, value=value, headers=headers)
        except kerr.KafkaError as err:  # no metadata in time, larger than a request, a transaction in error
            on_done(err)
            return err
        future.add_callback(lambda _metadata: on_done(None))
        future.add_errback(on_done)
        return None

    def refusal(self, err: Exception) -> Refusal:
        if isinstance(err, REJECTED):
            return Refusal.REJECTED
        if isinstance(err, FENCED):
            return Refusal.FENCED
        return Refusal.RETRY

    def flush(self, timeout_s: float) -> None:
        """Hurry the sends along; their answers come through their callbacks (kafka-python's flush can raise
        while a batch split for being too large is still on its way)."""
        try:
            self._producer.flush(timeout=timeout_s)
        except kerr.KafkaError as err:
            log.debug("flush: %s", err)

    def begin_transaction(self) -> None:
        self._producer.begin_transaction()

    def send_offsets_to_transaction(self, offsets: dict[TP, int], group_metadata: Any) -> None:
        self._producer.send_offsets_to_transaction(
            {TopicPartition(*tp): OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}, group_metadata)

    def commit_transaction(self) -> None:
        self._producer.commit_transaction()

    def abort_transaction(self) -> None:
        self._producer.abort_transaction()

    def close(self, timeout_s: float) -> None:
        """`timeout_s=0`: at once, its pending sends failed (kafka-python's close(0) flushes first and raises
        while a send is pending, leaving the I/O thread running)."""
        if timeout_s == 0:
            self._producer._sender.force_close()
        try:
            self._producer.close(timeout=timeout_s)
        except kerr.KafkaError as err:  # after a long outage close(0) raises; the producer is gone all the same
            log.debug("closing the producer: %s", err)


class TopicLimits:
    """Each output topic's max.message.bytes, refreshed every `interval_s` off the hot path: a result the
    topic can never take becomes a dead letter before it is sent. (Refused by the broker instead, kafka-python
    splits the batch and can then retry for its whole delivery timeout.)"""

    def __init__(self, settings: KafkaSettings, topics: list[str], interval_s: float = 30.0) -> None:
        self.settings, self.topics, self.interval_s = settings, topics, interval_s
        self.limits: dict[str, int] = {}
        self._stop = threading.Event()
        self.refresh()
        threading.Thread(target=self._run, name="topic-limits", daemon=True).start()

    def get(self, topic: str) -> int | None:
        return self.limits.get(topic)

    def refresh(self) -> None:
        admin = KafkaAdminClient(**self.settings.client_config("sentiment-worker-limits"))
        try:
            found = admin.describe_configs([ConfigResource("TOPIC", t, ["max.message.bytes"]) for t in self.topics],
                                           config_filter="all")
            for topic, configs in found.get("topic", {}).items():
                if "max.message.bytes" in configs:  # a missing topic has none (connecting says so in one line)
                    self.limits[topic] = int(configs["max.message.bytes"]["value"])
        finally:
            admin.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.refresh()
            except Exception as err:  # noqa: BLE001 - the broker may be away; the last limits stay
                log.debug("topic limits refresh failed: %s", err)

    def stop(self) -> None:
        self._stop.set()
