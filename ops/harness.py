"""Running the system from the outside, as an operator would: topics, publishing, reading back,
and `python -m worker` as a child process. Used by the demo, the benchmarks and the tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from tqdm import tqdm

from contract.kafka import KafkaSettings
from contract.records import DLQ_TOPIC, INPUT_TOPIC, OUTPUT_TOPIC
from producer.pacing import Pacer
from producer.topics import create_topics

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Topics:
    """The worker's input, output and dead-letter topics and its group."""

    settings: KafkaSettings
    input: str = INPUT_TOPIC
    output: str = OUTPUT_TOPIC
    dlq: str = DLQ_TOPIC
    group: str = "sentiment-workers"
    created: list[str] = field(default_factory=list)

    @classmethod
    def prefixed(cls, settings: KafkaSettings, prefix: str) -> Topics:
        """Fresh names for one test or benchmark run."""
        return cls(settings, f"{prefix}.in", f"{prefix}.out", f"{prefix}.dlq", f"{prefix}-group")

    def create(self, partitions: int = 1) -> Topics:
        create_topics(self.settings, {self.input: partitions, self.output: 1, self.dlq: 1}, "harness-admin")
        self.created += [self.input, self.output, self.dlq]
        return self

    def delete(self) -> None:
        if not self.created:
            return
        try:
            admin = KafkaAdminClient(**self.settings.client_config("harness-admin"))
            admin.delete_topics(self.created)
            admin.close()
        except KafkaError:
            pass

    def worker_args(self) -> list[str]:
        return ["--input-topic", self.input, "--output-topic", self.output, "--dlq-topic", self.dlq,
                "--group", self.group]


def publish(settings: KafkaSettings, topic: str, values: list[bytes | None], keys: list[bytes] | None = None,
            headers: list[tuple[str, bytes]] | None = None, rate: float = 0.0) -> None:
    """Send `values` (at `rate` per second when given) and wait until all are acknowledged."""
    producer = KafkaProducer(**settings.client_config("harness-producer"), acks="all", linger_ms=5,
                             max_request_size=2 << 20)
    pacer = Pacer(rate)
    for i, value in enumerate(values):
        producer.send(topic, value=value, key=keys[i] if keys else None, headers=headers or [])
        pacer.tick()
    producer.flush()
    producer.close()


def read(settings: KafkaSettings, topic: str, count: int, timeout: float = 60, committed_only: bool = False,
         settle: float = 0.0, progress: str | None = None) -> list:
    """Records of `topic` from the start until `count` arrived (then `settle` more seconds) or `timeout`."""
    consumer = KafkaConsumer(topic, **settings.client_config("harness-reader"), auto_offset_reset="earliest",
                             enable_auto_commit=False,
                             isolation_level="read_committed" if committed_only else "read_uncommitted")
    records: list = []
    deadline, settle_until = time.monotonic() + timeout, None
    with tqdm(total=count, desc=progress, unit="rec", file=sys.stderr, disable=progress is None) as bar:
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
                bar.update(len(batch))
            if len(records) >= count and settle_until is None:
                settle_until = time.monotonic() + settle
            if settle_until is not None and time.monotonic() >= settle_until:
                break
    consumer.close()
    return records


class WorkerProcess:
    """`python -m worker` (or a `module` that wraps its main) as a child process, with its metrics
    endpoint on loopback."""

    def __init__(self, artifact: Path, topics: Topics, *args: str, env: dict[str, str] | None = None,
                 metrics_port: int = 0, log: Path | None = None, module: str = "worker") -> None:
        self.metrics_port, self.log = metrics_port, log
        cmd = [sys.executable, "-m", module, "--model", str(artifact), *topics.worker_args(),
               "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port), *args]
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env or dict(os.environ), stdout=out,
                                     stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and the exit code; a worker still running after `timeout` is killed, and the error names its
        log, where its threads' stacks went first."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.dump_stacks()
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise RuntimeError(f"worker pid {self.proc.pid} still ran {timeout:.0f} s after SIGTERM; killed "
                               f"(its threads' stacks: {self.log or 'no log kept'})") from None

    def dump_stacks(self) -> None:
        """Every thread's stack, appended to the worker's log: py-spy reads them from outside, the worker runs on
        (a signal handler inside it, such as faulthandler's, can crash a process whose threads are busy)."""
        if not self.log or not self.alive():
            return
        with open(self.log, "ab") as out:
            out.write(f"--- py-spy dump of pid {self.proc.pid}\n".encode())
            out.flush()
            try:
                subprocess.run([str(Path(sys.executable).with_name("py-spy")), "dump", "--pid", str(self.proc.pid)],
                               stdout=out, stderr=out, timeout=60, check=False)
            except (OSError, subprocess.TimeoutExpired) as err:
                out.write(f"py-spy failed: {err}\n".encode())

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log and self.log.exists() else ""

    def _get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as response:
            return response.read().decode()

    def wait_ready(self, timeout: float = 120) -> WorkerProcess:
        """Wait for /readyz; a worker that does not get there is killed, never left behind."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the worker exited with {self.proc.returncode}: {self.tail()}")
            try:
                self._get("/readyz")
                return self
            except OSError:
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"the worker was not ready within {timeout:.0f} s: {self.tail()}")

    def metrics(self) -> str:
        return self._get("/metrics")

    def metric(self, name: str) -> float:
        """The sum over a metric's series (e.g. classified over both labels)."""
        return sum(float(line.rsplit(" ", 1)[1]) for line in self.metrics().splitlines()
                   if line.startswith((name + " ", name + "{")))

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(timeout=10)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
