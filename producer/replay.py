"""`sentiment-producer --replay-dlq reviews.dlq`: after a fix, send dead letters' original records again.

Reads the dead-letter topic from the start (or from --since) up to its end at the time of the
call, keeps the dead letters whose code was chosen, and republishes each original value to the
input topic with its key and headers, plus a header naming the dead letter it came from. A
dead letter keeps at most the first 64 KiB of its value, so a truncated one (every `too_large`)
cannot be replayed and is refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from contract.cli import UserError
from contract.kafka import KafkaSettings
from contract.records import DeadLetterCode
from producer.pacing import Pacer

REPLAYED_FROM = "sentiment-replayed-from"  # header: "<dead-letter topic>:<partition>:<offset>"
RETRYABLE = tuple(c.value for c in (DeadLetterCode.MODEL_ERROR, DeadLetterCode.OUTPUT_REJECTED,
                                     DeadLetterCode.INTERNAL_ERROR))  # failures a fix on our side can cure
KNOWN = tuple(c.value for c in DeadLetterCode)
UNREPLAYABLE = {"too_large": "too_large dead letters hold only the first 64 KiB of the value and cannot be replayed"}
STALL_S = 30.0
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


@dataclass
class ReplayTally:
    dead_letters: int = 0  # read from the dead-letter topic
    chosen: int = 0  # of a chosen code
    replayed: int = 0  # acknowledged on the input topic
    truncated: int = 0  # chosen, but holding only a prefix of the value
    unreadable: int = 0  # not a dead letter of this system
    failed: int = 0  # refused by the input topic

    def ack(self, _metadata: object) -> None:
        self.replayed += 1

    def fail(self, err: Exception) -> None:
        self.failed += 1
        print(f"warning: a replayed record failed: {type(err).__name__}: {err}", file=sys.stderr)


def parse_codes(text: str) -> tuple[str, ...]:
    codes = tuple(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))
    for code in codes:
        if code in UNREPLAYABLE:
            raise UserError(UNREPLAYABLE[code])
        if code not in KNOWN:
            raise UserError(f"--codes: unknown dead-letter code {code!r}; known: {', '.join(KNOWN)}")
    if not codes:
        raise UserError("--codes: name at least one dead-letter code")
    return codes


def parse_since(text: str, now: float | None = None) -> float:
    """Epoch seconds of --since: a duration back from now (90s, 30m, 2h, 1d), epoch seconds, or an
    ISO 8601 time (UTC when it names no zone)."""
    now = time.time() if now is None else now
    text = text.strip()
    if match := _DURATION.match(text):
        return now - float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        raise UserError(f"--since {text!r}: use a duration (30m, 2h, 1d), epoch seconds or an ISO 8601 time") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def replay(settings: KafkaSettings, producer: KafkaProducer, dlq_topic: str, topic: str, codes: tuple[str, ...],
           since: float | None = None, rate: float = 0.0) -> ReplayTally:
    """Replay the chosen dead letters of `dlq_topic` (committed ones only) into `topic`."""
    consumer = KafkaConsumer(**settings.client_config("sentiment-replay"), enable_auto_commit=False,
                             isolation_level="read_committed", auto_offset_reset="earliest")
    tally, pacer = ReplayTally(), Pacer(rate)
    try:
        partitions = consumer.partitions_for_topic(dlq_topic)
        if not partitions:
            raise UserError(f"dead-letter topic {dlq_topic!r} does not exist")
        tps = [TopicPartition(dlq_topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        ends = consumer.end_offsets(tps)
        if since is None:
            consumer.seek_to_beginning(*tps)
        else:
            found = consumer.offsets_for_times({tp: int(since * 1000) for tp in tps})
            for tp in tps:
                consumer.seek(tp, found[tp].offset if found.get(tp) else ends[tp])
        last_progress = time.monotonic()
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            batches = consumer.poll(timeout_ms=500)
            if batches:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > STALL_S:
                raise UserError(f"reading {dlq_topic!r} made no progress for {STALL_S:.0f} s")
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        continue
                    tally.dead_letters += 1
                    _replay_one(record, producer, topic, codes, tally, pacer)
        producer.flush()
    finally:
        consumer.close(autocommit=False)
    return tally


def _replay_one(record, producer: KafkaProducer, topic: str, codes: tuple[str, ...], tally: ReplayTally,
                pacer: Pacer) -> None:
    where = f"{record.topic}:{record.partition}:{record.offset}"
    try:
        letter = json.loads(record.value)
        code, size = letter["error"], int(letter["value_size"])
        value = base64.b64decode(letter["value_b64"], validate=True)
    except (TypeError, ValueError, KeyError, binascii.Error):
        tally.unreadable += 1
        print(f"warning: {where} is not a dead letter of this system; skipped", file=sys.stderr)
        return
    if code not in codes:
        return
    tally.chosen += 1
    if len(value) < size:
        tally.truncated += 1
        print(f"warning: {where} ({code}) holds only {len(value)} of {size} bytes; not replayed", file=sys.stderr)
        return
    headers = [(k, v) for k, v in (record.headers or []) if k != REPLAYED_FROM]
    headers.append((REPLAYED_FROM, where.encode()))
    producer.send(topic, key=record.key, value=value, headers=headers).add_callback(tally.ack).add_errback(tally.fail)
    pacer.tick()
