"""The worker's command line (DESIGN.md) as one dataclass; every flag also reads SENTIMENT_<FLAG>."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from contract.cli import UserError, apply_env_defaults
from contract.records import DEFAULT_MAX_RECORD_BYTES, DLQ_TOPIC, INPUT_TOPIC, OUTPUT_TOPIC

GUARANTEES = ("at-least-once", "exactly-once")
KAFKA_CLIENTS = ("kafka-python", "confluent")


@dataclass(frozen=True)
class WorkerConfig:
    model: str
    input_topic: str = INPUT_TOPIC
    output_topic: str = OUTPUT_TOPIC
    dlq_topic: str = DLQ_TOPIC
    group: str = "sentiment-workers"
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"
    max_batch_size: int = 64
    max_batch_tokens: int = 8192
    max_wait_ms: int = 25
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    max_in_flight: int = 2048
    max_in_flight_bytes: int = 64 << 20
    guarantee: str = "at-least-once"
    commit_interval_ms: int = 100
    instance_id: str = ""
    static_membership: bool = False
    session_timeout_ms: int = 10_000
    max_device_failures: int = 3
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9108
    log_level: str = "INFO"
    kafka_client: str = "kafka-python"

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_tokens", "max_record_bytes", "max_in_flight", "max_in_flight_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_in_flight < self.max_batch_size:
            raise UserError("--max-in-flight must be at least --max-batch-size")
        if self.max_device_failures < 1:
            raise UserError("--max-device-failures must be at least 1")
        if self.static_membership and not self.instance_id:
            raise UserError("--static-membership needs a stable --instance-id (a pod name)")
        if self.max_wait_ms < 0 or self.commit_interval_ms < 0:
            raise UserError("--max-wait-ms and --commit-interval-ms cannot be negative")

    @property
    def transactional_id(self) -> str:
        """Stable per instance: give each replica its own --instance-id (a pod name) for instant fencing."""
        return f"{self.group}.{self.instance_id or f'{socket.gethostname()}-{os.getpid()}'}"


def parse_args(argv: Sequence[str] | None = None) -> WorkerConfig:
    p = argparse.ArgumentParser(prog="python -m worker", description="Classify review sentiment from Kafka.")
    p.add_argument("--model", required=True, help="artifact folder (models/artifacts/NAME)")
    p.add_argument("--input-topic", default=INPUT_TOPIC)
    p.add_argument("--output-topic", default=OUTPUT_TOPIC)
    p.add_argument("--dlq-topic", default=DLQ_TOPIC)
    p.add_argument("--group", default="sentiment-workers")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--quantize", default="none", choices=("none", "int8"))
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="padded tokens: rows x longest row")
    p.add_argument("--max-wait-ms", type=int, default=25, help="a batch waits at most this long for company")
    p.add_argument("--max-record-bytes", type=int, default=DEFAULT_MAX_RECORD_BYTES)
    p.add_argument("--max-in-flight", type=int, default=2048, help="records held between poll and commit")
    p.add_argument("--max-in-flight-bytes", type=int, default=64 << 20, help="input bytes held, at most")
    p.add_argument("--guarantee", default="at-least-once", choices=GUARANTEES)
    p.add_argument("--commit-interval-ms", type=int, default=100, help="pace of commits (and transactions)")
    p.add_argument("--instance-id", default="", help="stable name of this replica: its transactional id")
    p.add_argument("--static-membership", action="store_true",
                   help="use --instance-id as the group instance id (KIP-345): a restart keeps its partitions")
    p.add_argument("--session-timeout-ms", type=int, default=10_000,
                   help="the group drops a member silent this long (a static member: its partitions wait)")
    p.add_argument("--max-device-failures", type=int, default=3,
                   help="forward calls failing in a row before the worker exits (the device is broken)")
    p.add_argument("--metrics-host", default="0.0.0.0")
    p.add_argument("--metrics-port", type=int, default=9108, help="0 turns the metrics server off")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument("--kafka-client", default="kafka-python", choices=KAFKA_CLIENTS,
                   help="kafka-python (pure Python) or confluent (librdkafka: pip install '.[fast]')")
    apply_env_defaults(p)
    return WorkerConfig(**vars(p.parse_args(argv)))
