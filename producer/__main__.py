"""`sentiment-producer` (python -m producer): stream reviews into Kafka (key = id, acks=all, idempotent),
or replay dead letters after a fix (--replay-dlq); ends with a one-line JSON summary."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kafka import KafkaProducer
from kafka.errors import KafkaError
from tqdm import tqdm

from contract.cli import Option, Parser, UserError, run
from contract.kafka import KafkaSettings, explain_connection_error
from contract.records import INPUT_TOPIC, encode_review
from contract.review_files import FORMATS, BadRow, read_reviews
from producer.pacing import Pacer
from producer.replay import RETRYABLE, parse_codes, parse_since, replay
from producer.topics import create_topics

COMPRESSION = ("none", "gzip", "lz4", "zstd")
OPTIONS = (
    Option("topic", INPUT_TOPIC, "topic to publish to (created when missing)"),
    Option("input", None, "PATH or - for stdin"),
    Option("format", None, "default: from the file extension (stdin: text)", FORMATS),
    Option("rate", 0.0, "records per second (0 = as fast as possible)"),
    Option("limit", 0, "stop after N records (0 = all)"),
    Option("repeat", 1, "pass over the input N times (ids made unique)"),
    Option("partitions", 1, "partitions when the topic must be created"),
    Option("compression", "none", "compression of the batches", COMPRESSION),
    Option("id_prefix", "", "prefix for ids of rows that carry none"),
    Option("replay_dlq", None, "instead of --input: republish the original records of this dead-letter topic's "
                               "dead letters to --topic"),
    Option("codes", ",".join(RETRYABLE), "with --replay-dlq: the dead-letter codes to replay, comma-separated"),
    Option("since", None, "with --replay-dlq: only dead letters written since TIME (30m, 2h, 1d, epoch seconds "
                          "or ISO 8601)"),
)


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


def parser(env: Mapping[str, str] | None = None) -> Parser:
    p = Parser(prog="sentiment-producer", description=__doc__, env=env)
    p.add_version("sentiment-producer")
    p.add_options(OPTIONS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.partitions < 1 or args.repeat < 1 or args.rate < 0:
        raise UserError("--partitions and --repeat must be at least 1, --rate cannot be negative")
    if (args.input is None) == (args.replay_dlq is None):
        raise UserError("give either --input PATH|- or --replay-dlq TOPIC")
    settings = KafkaSettings.from_env()
    if args.replay_dlq:
        codes, since = parse_codes(args.codes), None if args.since is None else parse_since(args.since)
        producer = connect(settings, args)
        started = time.perf_counter()
        tally = replay(settings, producer, args.replay_dlq, args.topic, codes, since, args.rate)
        producer.close()
        summary = {**vars(tally), "seconds": round(time.perf_counter() - started, 2)}
        print(json.dumps(summary))
        return 1 if tally.failed or tally.truncated or tally.replayed != tally.chosen - tally.truncated else 0
    return publish_file(settings, args)


def connect(settings: KafkaSettings, args: argparse.Namespace) -> KafkaProducer:
    """The target topic (created when missing) and an idempotent producer; connection errors in one line."""
    try:
        create_topics(settings, {args.topic: args.partitions}, "sentiment-producer-admin")
        return KafkaProducer(
            **settings.client_config("sentiment-producer"), acks="all", enable_idempotence=True, linger_ms=5,
            compression_type=None if args.compression == "none" else args.compression, batch_size=64 * 1024)
    except KafkaError as err:
        raise explain_connection_error(settings, err) from None


def publish_file(settings: KafkaSettings, args: argparse.Namespace) -> int:
    rows = read_reviews(args.input, args.format)  # fails early on a missing file
    producer = connect(settings, args)
    tally = Tally()
    pacer = Pacer(args.rate)
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
                pacer.tick()
                if args.limit and tally.sent >= args.limit:
                    break
            if args.limit and tally.sent >= args.limit:
                break
        producer.flush()
    producer.close()
    seconds = time.perf_counter() - pacer.started
    summary = {"read": tally.read, "sent": tally.sent, "acknowledged": tally.acknowledged, "failed": tally.failed,
               "skipped_rows": tally.skipped, "seconds": round(seconds, 2),
               "msgs_per_s": round(tally.acknowledged / seconds, 1) if seconds else 0.0}
    print(json.dumps(summary))
    return 1 if tally.failed or tally.acknowledged != tally.sent else 0


def cli() -> None:
    """The `sentiment-producer` console script."""
    run(main)


if __name__ == "__main__":
    cli()
