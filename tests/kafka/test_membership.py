"""Group membership against a real broker: a restarted worker takes its partitions back fast
(static membership: at once; dynamic: after the session timeout), and a caught-up worker on
transactional input reports no lag."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
from kafka import KafkaConsumer, KafkaProducer

from ops.harness import WorkerProcess, free_port, publish, read
from tests.conftest import CLIENTS

SESSION_MS = 10_000


class Tail(threading.Thread):
    """Reads the output topic as it grows: (classified_at, id) of every result."""

    def __init__(self, settings, topic: str) -> None:
        super().__init__(daemon=True)
        self.consumer = KafkaConsumer(topic, **settings.client_config("tests-tail"), auto_offset_reset="earliest")
        self.seen: list[tuple[float, str]] = []
        self.running = True

    def run(self) -> None:
        while self.running:
            for batch in self.consumer.poll(timeout_ms=200).values():
                self.seen.extend((json.loads(r.value)["classified_at"], json.loads(r.value)["id"]) for r in batch)
        self.consumer.close()

    def first_after(self, moment: float, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            later = [at for at, _ in self.seen if at > moment]
            if later:
                return min(later)
            time.sleep(0.1)
        return None


def startup_done(port: int, timeout: float = 120) -> float:
    """Wall-clock time at which /startupz first answers 200 (the model is loaded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/startupz", timeout=2):
                return time.time()
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the model did not load in time")


@pytest.mark.parametrize(("static", "kafka_client"), [
    (True, "kafka-python"), (False, "kafka-python"), (True, "confluent"),
    pytest.param(False, "confluent", marks=pytest.mark.long)], ids=["static", "dynamic", "static-confluent",
                                                                    "dynamic-confluent"])
def test_a_sigkilled_worker_restarted_gets_back_to_work(tiny_artifact, topics, env, kafka_settings, tmp_path,
                                                         static, kafka_client):
    topics.create(partitions=2)
    stream = threading.Thread(target=publish, daemon=True, args=(
        kafka_settings, topics.input, [json.dumps({"id": f"m{i}", "text": f"a fine film {i}"}).encode()
                                       for i in range(3000)]), kwargs={"rate": 60})
    stream.start()
    tail = Tail(kafka_settings, topics.output)
    tail.start()
    args = ["--device", "cpu", "--instance-id", "replica-0", "--session-timeout-ms", str(SESSION_MS),
            *(["--static-membership"] if static else [])]
    port = free_port()
    log = tmp_path / "w.log"
    with WorkerProcess(tiny_artifact, topics, *args, env=env, metrics_port=port, log=log) as first:
        first.wait_ready()
        assert tail.first_after(time.time(), 30) is not None, first.tail()
        first.kill()
        killed = time.time()
    with WorkerProcess(tiny_artifact, topics, *args, env=env, metrics_port=port, log=log) as second:
        loaded = startup_done(port)
        delivered = tail.first_after(loaded, SESSION_MS / 1000 + 20)
        assert delivered is not None, second.tail()
        assert second.terminate() == 0
    tail.running = False
    waited = delivered - loaded
    print(f"restart ({'static' if static else 'dynamic'} membership, {kafka_client}): first result {waited:.1f} s "
          f"after the model loaded, {delivered - killed:.1f} s after the SIGKILL "
          f"(session timeout {SESSION_MS / 1000:.0f} s)")
    assert waited < (5 if static else SESSION_MS / 1000 + 5)


@pytest.mark.parametrize("kafka_client", CLIENTS)
def test_a_caught_up_worker_on_transactional_input_shows_no_lag(tiny_artifact, topics, env, kafka_settings,
                                                                 tmp_path):
    topics.create(partitions=2)
    producer = KafkaProducer(**kafka_settings.client_config("tests-txn"), transactional_id=f"{topics.group}-in")
    producer.init_transactions()
    for batch in range(5):
        producer.begin_transaction()
        for i in range(40):
            producer.send(topics.input, json.dumps({"id": f"t{batch}-{i}", "text": "a fine film"}).encode())
        producer.commit_transaction()
    producer.close()
    port = free_port()
    with WorkerProcess(tiny_artifact, topics, "--device", "cpu", env=env, metrics_port=port,
                       log=tmp_path / "w.log") as worker:
        assert len(read(kafka_settings, topics.output, 200, timeout=60, settle=1)) == 200
        deadline = time.monotonic() + 30
        lags: list[float] = []
        while time.monotonic() < deadline:
            lags = [float(line.rsplit(" ", 1)[1]) for line in worker.metrics().splitlines()
                    if line.startswith("sentiment_worker_consumer_lag{")]
            if len(lags) == 2 and not any(lags):
                break
            time.sleep(1)
    assert lags == [0.0, 0.0], lags
