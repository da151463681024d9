"""`python -m producer`: stream reviews into Kafka (key = id, acks=all, idempotent), with a summary."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from tqdm import tqdm

from contract.cli import UserError, apply_env_defaults, run
from contract.kafka import KafkaSettings, explain_connection_error
from contract.records import INPUT_TOPIC, encode_review
from contract.review_files import FORMATS, BadRow, read_reviews

COMPRESSION = ("none", "gzip", "lz4", "zstd")


@dataclass
class Tally:
    read: int = 0
    sent: int = 0
    acknowledged: int = 0
    failed: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        self.lock = threading.Lock()

    def ack(self, _metadata: object) -> None:
        with self.lock:
            self.acknowledged += 1

    def fail(self, err: Exception) -> None:
        with self.lock:
            self.failed += 1
        print(f"warning: a record failed: {type(err).__name__}: {err}", file=sys.stderr)


def ensure_topic(settings: KafkaSettings, topic: str, partitions: int) -> None:
    """Create the topic with N partitions when it is missing (single-broker friendly replication 1 by default)."""
    admin = KafkaAdminClient(**settings.client_config("sentiment-producer-admin"))
    try:
        if topic not in admin.list_topics():
            admin.create_topics([NewTopic(topic, partitions, replication_factor=-1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m producer", description=__doc__)
    p.add_argument("--topic", default=INPUT_TOPIC)
    p.add_argument("--input", required=True, help="PATH or - for stdin")
    p.add_argument("--format", choices=FORMATS, help="default: from the file extension (stdin: text)")
    p.add_argument("--rate", type=float, default=0, help="records per second (0 = as fast as possible)")
    p.add_argument("--limit", type=int, default=0, help="stop after N records (0 = all)")
    p.add_argument("--repeat", type=int, default=1, help="pass over the input N times (ids made unique)")
    p.add_argument("--partitions", type=int, default=1, help="partitions when the topic must be created")
    p.add_argument("--compression", default="none", choices=COMPRESSION)
    p.add_argument("--id-prefix", default="", help="prefix for ids of rows that carry none")
    apply_env_defaults(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.partitions < 1 or args.repeat < 1 or args.rate < 0:
        raise UserError("--partitions and --repeat must be at least 1, --rate cannot be negative")
    settings = KafkaSettings.from_env()
    rows = read_reviews(args.input, args.format)  # fails early on a missing file
    try:
        ensure_topic(settings, args.topic, args.partitions)
        producer = KafkaProducer(
            **settings.client_config("sentiment-producer"), acks="all", enable_idempotence=True, linger_ms=5,
            compression_type=None if args.compression == "none" else args.compression, batch_size=64 * 1024)
    except KafkaError as err:
        raise explain_connection_error(settings, err) from None
    tally = Tally()
    started = time.perf_counter()
    name = "stdin" if args.input == "-" else args.input
    passes = [rows] + [read_reviews(args.input, args.format) for _ in range(args.repeat - 1)]
    with tqdm(desc=f"publishing to {args.topic}", unit="rec", file=sys.stderr, total=args.limit or None) as bar:
        for n, source in enumerate(passes):
            for row in source:
                if isinstance(row, BadRow):
                    tally.skipped += 1
                    print(f"warning: {name}:{row.line}: skipped: {row.reason}", file=sys.stderr)
                    continue
                tally.read += 1
                review_id = row.id or f"{args.id_prefix}{row.line}"
                if n:
                    review_id = f"{review_id}#{n}"
                meta = dict(row.meta or {})
                if row.label is not None:
                    meta["label"] = row.label
                future = producer.send(args.topic, key=review_id.encode(),
                                       value=encode_review(review_id, row.text, meta))
                future.add_callback(tally.ack).add_errback(tally.fail)
                tally.sent += 1
                bar.update()
                if args.rate:
                    delay = started + tally.sent / args.rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                if args.limit and tally.sent >= args.limit:
                    break
            if args.limit and tally.sent >= args.limit:
                break
        producer.flush()
    producer.close()
    seconds = time.perf_counter() - started
    summary = {"read": tally.read, "sent": tally.sent, "acknowledged": tally.acknowledged, "failed": tally.failed,
               "skipped_rows": tally.skipped, "seconds": round(seconds, 2),
               "msgs_per_s": round(tally.acknowledged / seconds, 1) if seconds else 0.0}
    print(json.dumps(summary))
    return 1 if tally.failed or tally.acknowledged != tally.sent else 0


if __name__ == "__main__":
    run(main)
