"""Faults and abuse: broker restart, malformed floods, kills and rebalance storms, an output topic
that refuses writes, and security. Every scenario must lose nothing."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time

import pytest
from kafka import KafkaAdminClient, TopicPartition

from ops.harness import WorkerProcess, free_port, publish, read
from tests.conftest import ROOT, sasl_env
from tests.faults.conftest import PeakMemory, broker

MIB = 1 << 20


def start(artifact, topics, env, *args, **kwargs) -> WorkerProcess:
    return WorkerProcess(artifact, topics, "--device", "cpu", *args, env=env, **kwargs)


def reviews(n: int, prefix: str) -> tuple[list[bytes], list[bytes], set[str]]:
    ids = [f"{prefix}{i}" for i in range(n)]
    vals = [json.dumps({"id": i, "text": f"review {i} " + "a fine film " * (k % 9 + 1)}).encode()
            for k, i in enumerate(ids)]
    return vals, [i.encode() for i in ids], set(ids)


def ids_of(records: list) -> list[str]:
    return [json.loads(r.value)["id"] for r in records]


def committed_total(settings, group: str, topic: str, partitions: int) -> int:
    admin = KafkaAdminClient(**settings.client_config("faults-offsets"))
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    got = admin.list_group_offsets({group: tps}).get(group, {})
    admin.close()
    return sum(max(0, got[tp].offset) for tp in tps if tp in got)


def test_broker_restart_mid_stream(tiny_artifact, topics, env, kafka_settings, local_broker, summary, tmp_path):
    topics.create(partitions=2)
    vals, keys, ids = reviews(4000, "b")
    publish(kafka_settings, topics.input, vals[:3000], keys[:3000])
    with start(tiny_artifact, topics, env, "--max-batch-size", "16", log=tmp_path / "w.log") as worker:
        read(kafka_settings, topics.output, 500, timeout=60)
        broker(local_broker, "stop")
        time.sleep(5)
        broker(local_broker, "start")
        publish(kafka_settings, topics.input, vals[3000:], keys[3000:])
        results = read(kafka_settings, topics.output, 4000, timeout=180, settle=2)
        assert worker.alive(), worker.tail()
    lost, _ = summary("broker restart", ids, ids_of(results))
    assert lost == 0


def malformed_flood() -> list[tuple[bytes | None, str]]:
    rng = random.Random(7)
    nested = b'{"a":' * 5000 + b"1" + b"}" * 5000
    kinds = [
        (lambda i: b"\xc3\x28 not utf-8 " + str(i).encode(), "invalid_utf8", 120),
        (lambda i: b'{"text": "broken ' + str(i).encode(), "invalid_json", 120),
        (lambda i: json.dumps({"title": f"no text {i}"}).encode(), "missing_text", 120),
        (lambda i: json.dumps({"text": ""}).encode(), "empty_text", 60),
        (lambda i: json.dumps({"text": " \t\n "}).encode(), "empty_text", 60),
        (lambda i: b"   \n  ", "empty_text", 60),
        (lambda i: None, "empty_text", 120),
        (lambda i: json.dumps({"text": [i, "list"]}).encode(), "bad_type", 120),
        (lambda i: b"x" * 900_000, "too_large", 20),
        (lambda i: b"\xff" + bytes(rng.getrandbits(8) for _ in range(200)), "invalid_utf8", 100),
        (lambda i: nested, "invalid_json", 100),
    ]
    flood = [(make(i), code) for make, code, count in kinds for i in range(count)]
    assert len(flood) == 1000
    return flood


def test_sst2_and_1000_malformed_records(tiny_artifact, topics, env, kafka_settings, sst2_dir, summary, tmp_path):
    topics.create(partitions=3)
    rows = [line.rsplit("\t", 1)[0] for split in ("train", "dev")
            for line in (sst2_dir / f"{split}.tsv").read_text().splitlines() if line]
    good = {f"s{i}": json.dumps({"id": f"s{i}", "text": t}).encode() for i, t in enumerate(rows)}
    flood = malformed_flood()
    values = list(good.values()) + [v for v, _ in flood]
    keys = [k.encode() for k in good] + [b"bad%d" % i for i in range(len(flood))]
    order = list(range(len(values)))
    random.Random(1).shuffle(order)
    port = free_port()
    with start(tiny_artifact, topics, env, metrics_port=port, log=tmp_path / "w.log") as worker:
        worker.wait_ready()
        memory = PeakMemory(worker.proc.pid)
        baseline = memory.process.memory_info().rss
        memory.start()
        publish(kafka_settings, topics.input, [values[i] for i in order], [keys[i] for i in order])
        results = read(kafka_settings, topics.output, len(good), timeout=300, settle=2)
        dead = read(kafka_settings, topics.dlq, len(flood), timeout=60, settle=2)
        peak = memory.stop()
        assert worker.alive(), worker.tail()
    codes = sorted(json.loads(r.value)["error"] for r in dead)
    lost, _ = summary("SST-2 + 1000 malformed", set(good), ids_of(results), len(dead))
    assert lost == 0 and len(results) == len(good)
    assert codes == sorted(code for _, code in flood)
    too_large = [json.loads(r.value) for r in dead if json.loads(r.value)["error"] == "too_large"]
    assert all(d["value_size"] == 900_000 and len(d["value_b64"]) <= 4 * 64 * 1024 // 3 + 4 for d in too_large)
    print(f"worker memory: {baseline / MIB:.0f} MiB ready, {peak / MIB:.0f} MiB peak")
    assert peak - baseline < 512 * MIB, f"memory grew by {(peak - baseline) / MIB:.0f} MiB"


def storm(artifact, topics, env, settings, tmp_path, summary, name, *args) -> int:
    topics.create(partitions=4)
    vals, keys, ids = reviews(6000, "s")
    producer = threading.Thread(target=publish, args=(settings, topics.input, vals, keys),
                                kwargs={"rate": 300}, daemon=True)
    producer.start()
    rng = random.Random(3)
    log = tmp_path / "storm.log"
    workers = [start(artifact, topics, env, *args, log=log)]
    deadline = time.monotonic() + 18
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(1.5, 3.0))
        alive = [w for w in workers if w.alive()]
        if len(alive) < 3 and (len(alive) <= 1 or rng.random() < 0.5):
            workers.append(start(artifact, topics, env, *args, log=log))
        else:
            victim = rng.choice(alive)
            victim.kill() if rng.random() < 0.5 else victim.terminate()
    producer.join()
    if not any(w.alive() for w in workers):
        workers.append(start(artifact, topics, env, *args, log=log))
    committed_only = "exactly-once" in args
    results = read(settings, topics.output, len(ids), timeout=240, committed_only=committed_only, settle=3)
    for w in workers:
        if w.alive():
            assert w.terminate() == 0, w.tail()
    lost, duplicated = summary(name, ids, ids_of(results))
    assert lost == 0
    return duplicated


def test_rebalance_storm_at_least_once(tiny_artifact, topics, env, kafka_settings, tmp_path, summary):
    storm(tiny_artifact, topics, env, kafka_settings, tmp_path, summary, "rebalance storm (at-least-once)")


@pytest.mark.long
def test_rebalance_storm_exactly_once(tiny_artifact, topics, env, kafka_settings, tmp_path, summary):
    duplicated = storm(tiny_artifact, topics, env, kafka_settings, tmp_path, summary,
                       "rebalance storm (exactly-once)", "--guarantee", "exactly-once")
    assert duplicated == 0


def test_output_refusing_writes_for_20s(tiny_artifact, topics, env, kafka_settings, local_broker, summary,
                                        tmp_path):
    topics.create(partitions=2)
    vals, keys, ids = reviews(3000, "o")
    broker(local_broker, "topic-config", topics.output, "--add-config", "max.message.bytes=10")
    time.sleep(2)
    with start(tiny_artifact, topics, env, metrics_port=free_port(), log=tmp_path / "w.log") as worker:
        memory = PeakMemory(worker.proc.pid)
        memory.start()
        publish(kafka_settings, topics.input, vals[:2000], keys[:2000])
        time.sleep(5)
        held = committed_total(kafka_settings, topics.group, topics.input, 2)
        publish(kafka_settings, topics.input, vals[2000:], keys[2000:])
        time.sleep(15)
        assert committed_total(kafka_settings, topics.group, topics.input, 2) == held == 0, "committed unsent"
        assert worker.alive(), worker.tail()
        broker(local_broker, "topic-config", topics.output, "--delete-config", "max.message.bytes")
        results = read(kafka_settings, topics.output, 3000, timeout=180, settle=2)
        peak = memory.stop()
        errors = worker.metric("sentiment_worker_publish_errors_total")
    lost, _ = summary("output refusing writes 20 s", ids, ids_of(results))
    assert lost == 0 and errors > 0
    print(f"worker peak memory during the outage: {peak / MIB:.0f} MiB")
    assert peak < 3 * 1024 * MIB


def test_sasl_worker_and_producer_with_right_and_wrong_credentials(tiny_artifact, topics, env, kafka_settings,
                                                                  summary, tmp_path):
    password = "sentiment-secret"
    good = sasl_env(env, password)
    topics.create()
    data = tmp_path / "r.txt"
    data.write_text("".join(f"review number {i} was fine\n" for i in range(200)))
    produced = subprocess.run([sys.executable, "-m", "producer", "--topic", topics.input, "--input", str(data)],
                              cwd=ROOT, env=good, capture_output=True, text=True, timeout=120)
    assert produced.returncode == 0, produced.stderr
    log = tmp_path / "w.log"
    with start(tiny_artifact, topics, good, metrics_port=free_port(), log=log) as worker:
        results = read(kafka_settings, topics.output, 200, timeout=60, settle=1)
        scrape = worker.metrics()
        assert worker.terminate() == 0
    summary("SASL/SCRAM worker", {str(line) for line in range(1, 201)}, ids_of(results))
    assert len(results) == 200
    wrong = "wrong-password-1234"
    started = time.monotonic()
    refused = subprocess.run([sys.executable, "-m", "worker", "--model", str(tiny_artifact), "--metrics-port", "0",
                              *topics.worker_args()], cwd=ROOT, env=sasl_env(env, wrong), capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0 and time.monotonic() - started < 30
    assert "credentials" in refused.stderr.strip().splitlines()[-1] and "Traceback" not in refused.stderr
    for text in (log.read_text(), scrape, produced.stderr, produced.stdout):
        assert password not in text
    assert wrong not in refused.stderr + refused.stdout
