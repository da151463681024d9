"""Helpers for tests against a real broker: topics, publishing, reading back, worker processes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError

from contract.kafka import KafkaSettings

ROOT = Path(__file__).resolve().parents[1]


def settings(bootstrap: str) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=bootstrap)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TopicSet:
    bootstrap: str
    prefix: str
    created: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.input = f"{self.prefix}.in"
        self.output = f"{self.prefix}.out"
        self.dlq = f"{self.prefix}.dlq"

    def admin(self) -> KafkaAdminClient:
        return KafkaAdminClient(**settings(self.bootstrap).client_config("tests-admin"))

    def create(self, partitions: int = 1, names: tuple[str, ...] | None = None) -> TopicSet:
        admin = self.admin()
        wanted = names or (self.input, self.output, self.dlq)
        admin.create_topics([NewTopic(t, partitions if t == self.input else 1, 1) for t in wanted])
        admin.close()
        self.created.extend(wanted)
        return self

    def delete_all(self) -> None:
        if not self.created:
            return
        try:
            admin = self.admin()
            admin.delete_topics(self.created)
            admin.close()
        except KafkaError:
            pass

    def worker_args(self) -> list[str]:
        return ["--input-topic", self.input, "--output-topic", self.output, "--dlq-topic", self.dlq,
                "--group", f"{self.prefix}-group"]


def produce(bootstrap: str, topic: str, values: list[bytes | None], keys: list[bytes | None] | None = None,
            headers: list | None = None) -> None:
    producer = KafkaProducer(**settings(bootstrap).client_config("tests-producer"), acks="all", linger_ms=5,
                             max_request_size=2 << 20)
    for i, value in enumerate(values):
        producer.send(topic, value=value, key=keys[i] if keys else None, headers=headers or [])
    producer.flush()
    producer.close()


def read(bootstrap: str, topic: str, count: int, timeout: float = 60, committed_only: bool = False,
         settle: float = 0.0) -> list:
    """Records of `topic` from the start, until `count` arrived (then `settle` more seconds) or timeout."""
    consumer = KafkaConsumer(topic, **settings(bootstrap).client_config("tests-reader"),
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             isolation_level="read_committed" if committed_only else "read_uncommitted")
    records: list = []
    deadline = time.monotonic() + timeout
    settle_until = None
    while time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
        if len(records) >= count and settle_until is None:
            settle_until = time.monotonic() + settle
        if settle_until is not None and time.monotonic() >= settle_until:
            break
    consumer.close()
    return records


def values(records: list) -> list[dict]:
    return [json.loads(r.value) for r in records]


class WorkerProcess:
    """`python -m worker` as a child process, as an operator would run it."""

    def __init__(self, artifact: Path, topics: TopicSet, env: dict[str, str], *extra: str,
                 metrics_port: int = 0, log: Path | None = None) -> None:
        self.metrics_port = metrics_port
        args = [sys.executable, "-m", "worker", "--model", str(artifact), *topics.worker_args(),
                "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1", "--device", "cpu", *extra]
        self.log = log
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log and self.log.exists() else ""

    def wait_ready(self, timeout: float = 60) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"worker exited with {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"worker not ready in {timeout}s: {self.tail()}")

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *_exc) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(timeout=10)


def env_with(env: dict[str, str], **extra: str) -> dict[str, str]:
    merged = dict(env)
    merged.update(extra)
    return merged

