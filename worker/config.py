"""The worker's command line (DESIGN.md) as one dataclass: each field defines its option once,
and the parser, the SENTIMENT_* variables, --help and the README's table derive from it."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from contract.cli import DEVICE, DTYPE, QUANTIZE, Option, Parser, UserError, option, options_of
from contract.records import DEFAULT_MAX_RECORD_BYTES, DLQ_TOPIC, INPUT_TOPIC, OUTPUT_TOPIC

GUARANTEES = ("at-least-once", "exactly-once")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
KAFKA_CLIENTS = ("kafka-python", "confluent")
GRAPHS = ("torchscript", "eager")
IN_FLIGHT_BATCHES = 32  # --max-in-flight by default: with fewer, a length-sorted round leaves the device idle


@dataclass(frozen=True)
class WorkerConfig:
    model: str = option(required=True, help="artifact folder (models/artifacts/NAME)")
    input_topic: str = option(INPUT_TOPIC, "topic of the reviews")
    output_topic: str = option(OUTPUT_TOPIC, "topic of the results")
    dlq_topic: str = option(DLQ_TOPIC, "topic of the dead letters")
    group: str = option("sentiment-workers", "consumer group: all replicas share it")
    device: str = DEVICE.field()
    dtype: str = DTYPE.field()
    quantize: str = QUANTIZE.field()
    graph: str = option("torchscript", "how the encoder runs: torchscript (traced once at start, checked against "
                                       "eager; eager if it does not trace) or eager", GRAPHS)
    max_batch_size: int | None = option(help="a batch closes at this many records (default: 64 on a CPU, 256 on "
                                             "CUDA)")
    max_batch_tokens: int | None = option(help="a batch closes at this many padded tokens, rows x longest row "
                                               "(default: 8192 on a CPU, 32768 on CUDA)")
    batch_overhead_tokens: int | None = option(help="a batch's fixed cost in padded tokens: a batch also ends before "
                                                    "a longer record whose padding of the rows already in it would "
                                                    "cost more (default: 64 on a CPU, 4096 on CUDA; 0: no padding, "
                                                    "above --max-batch-tokens: the caps alone)")
    max_wait_ms: int = option(25, "a batch closes this long after its first record arrived")
    max_record_bytes: int = option(DEFAULT_MAX_RECORD_BYTES, "larger values are dead letters (too_large)")
    max_in_flight: int | None = option(help="records held between poll and commit, at most (default: "
                                            "--max-batch-size x 32, so that several batches wait sorted for the "
                                            "device while earlier ones are published: 2048 on a CPU, 8192 on CUDA)")
    max_in_flight_bytes: int = option(64 << 20, "input bytes held between poll and commit, at most")
    guarantee: str = option("at-least-once", "delivery guarantee", GUARANTEES)
    commit_interval_ms: int = option(100, "pace of commits (and transactions)")
    instance_id: str = option("", "stable name of this replica (a pod name): its transactional id and its logs' "
                                      "instance (default: host-pid)")
    static_membership: bool = option(False, "use --instance-id as the group instance id (KIP-345): "
                                            "a restart under the same name keeps its partitions")
    session_timeout_ms: int = option(10_000, "the group drops a member silent this long "
                                             "(a static member: its partitions wait)")
    max_device_failures: int = option(3, "forward calls failing in a row before the worker exits (the device is "
                                         "broken)")
    metrics_host: str = option("0.0.0.0", "address of /metrics, /healthz, /readyz, /startupz")
    metrics_port: int = option(9108, "port of the metrics server; 0 turns it off")
    log_level: str = option("INFO", "log level, any case", LOG_LEVELS)
    log_format: str = option("text", "json: one object per line (with the instance) for log shippers", LOG_FORMATS)
    kafka_client: str = option("kafka-python", "kafka-python (pure Python) or confluent (librdkafka: pip install "
                                               "'.[fast]')", KAFKA_CLIENTS)
    check: bool = option(False, "load the model, reach Kafka, check the topics and the group, print what was "
                                "found and exit 0 or 1, consuming nothing")

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_tokens", "max_record_bytes", "max_in_flight", "max_in_flight_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_in_flight is not None and self.max_in_flight < (self.max_batch_size or 0):
            raise UserError(f"--max-in-flight ({self.max_in_flight}) must be at least --max-batch-size "
                            f"({self.max_batch_size}; 256 by default on CUDA)")
        if self.max_device_failures < 1:
            raise UserError("--max-device-failures must be at least 1")
        if self.static_membership and not self.instance_id:
            raise UserError("--static-membership needs a stable --instance-id (a pod name)")
        if self.max_wait_ms < 0 or self.commit_interval_ms < 0:
            raise UserError("--max-wait-ms and --commit-interval-ms cannot be negative")
        if self.batch_overhead_tokens is not None and self.batch_overhead_tokens < 0:
            raise UserError("--batch-overhead-tokens cannot be negative")

    def with_batch_caps(self, rows: int, tokens: int, overhead_tokens: int) -> WorkerConfig:
        """Caps left unset take the device's defaults (the model decides them: `Classifier.max_rows/max_tokens`),
        and so does a batch's cost in padded tokens (`Classifier.batch_overhead_tokens`)."""
        rows = self.max_batch_size or rows
        overhead = overhead_tokens if self.batch_overhead_tokens is None else self.batch_overhead_tokens
        return replace(self, max_batch_size=rows, max_batch_tokens=self.max_batch_tokens or tokens,
                       max_in_flight=self.max_in_flight or IN_FLIGHT_BATCHES * rows, batch_overhead_tokens=overhead)

    @property
    def instance(self) -> str:
        """This replica's name: --instance-id, else host and process id (unique, but not stable)."""
        return self.instance_id or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def transactional_id(self) -> str:
        """Stable per instance: give each replica its own --instance-id (a pod name) for instant fencing."""
        return f"{self.group}.{self.instance}"


OPTIONS: tuple[Option, ...] = options_of(WorkerConfig)


def parser(env: Mapping[str, str] | None = None) -> Parser:
    p = Parser(prog="sentiment-worker", description="Classify review sentiment from Kafka (python -m worker).",
               env=env)
    p.add_version("sentiment-worker")
    p.add_options(OPTIONS)
    return p


def parse_args(argv: Sequence[str] | None = None) -> WorkerConfig:
    return WorkerConfig(**vars(parser().parse_args(argv)))
