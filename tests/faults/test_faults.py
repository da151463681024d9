"""Faults and abuse: broker restart, malformed floods, kills and rebalance storms, an output topic
that refuses writes, and security. Every scenario must lose nothing."""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
import threading
import time

import pytest
from kafka import KafkaAdminClient, TopicPartition

from ops.harness import WorkerProcess, free_port, publish, read
from tests.conftest import CLIENTS, CLIENTS_LONG, GIVES_UP_S, ROOT, sasl_env
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


@pytest.mark.parametrize("kafka_client", CLIENTS_LONG)
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


@pytest.mark.parametrize("kafka_client", CLIENTS_LONG)
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


class CommitSampler(threading.Thread):
    """Reads the group's committed offsets every few hundred ms; notes any that moved backwards."""

    def __init__(self, settings, group: str, topic: str, partitions: int) -> None:
        super().__init__(daemon=True)
        self.admin = KafkaAdminClient(**settings.client_config("faults-sampler"))
        self.group, self.tps = group, [TopicPartition(topic, p) for p in range(partitions)]
        self.last: dict[int, int] = {}
        self.regressions: list[str] = []
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                got = self.admin.list_group_offsets({self.group: self.tps}).get(self.group, {})
            except Exception:  # noqa: BLE001 - the coordinator may be moving; sample again
                got = {}
            for tp, meta in got.items():
                if meta.offset < 0:
                    continue
                if meta.offset < self.last.get(tp.partition, 0):
                    self.regressions.append(f"partition {tp.partition}: {self.last[tp.partition]} -> {meta.offset}")
                self.last[tp.partition] = max(meta.offset, self.last.get(tp.partition, 0))
            time.sleep(0.3)

    def stop(self) -> list[str]:
        self.running = False
        self.join(timeout=10)
        self.admin.close()
        return self.regressions


def in_partition_order(records: list) -> bool:
    """Per input partition and output partition, the last copy of each offset appears in offset order."""
    seen: dict[tuple[int, int], list[int]] = {}
    for r in records:
        seen.setdefault((json.loads(r.value)["source"]["partition"], r.partition), []).append(
            json.loads(r.value)["source"]["offset"])
    for offsets in seen.values():
        last = list(dict.fromkeys(reversed(offsets)))[::-1]
        if last != sorted(last):
            return False
    return True


def storm(artifact, topics, env, settings, tmp_path, summary, name, *args) -> int:
    """Workers join and leave (SIGTERM, sometimes SIGKILL) every 2-4 s, 1-3 alive, over a backlog on 4
    partitions, while a sampler watches the committed offsets."""
    topics.create(partitions=4)
    vals, keys, ids = reviews(3642, "s")
    publish(settings, topics.input, vals, keys)
    sampler = CommitSampler(settings, topics.group, topics.input, 4)
    sampler.start()
    rng = random.Random(3)
    log = tmp_path / "storm.log"
    workers = [start(artifact, topics, env, *args, log=log)]
    deadline = time.monotonic() + 24
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(2.0, 4.0))
        alive = [w for w in workers if w.alive()]
        if len(alive) < 3 and (len(alive) <= 1 or rng.random() < 0.5):
            workers.append(start(artifact, topics, env, *args, log=log))
        else:
            victim = rng.choice(alive)
            victim.kill() if rng.random() < 0.25 else victim.terminate()
    if not any(w.alive() for w in workers):
        workers.append(start(artifact, topics, env, *args, log=log))
    committed_only = "exactly-once" in args
    results = read(settings, topics.output, len(ids), timeout=240, committed_only=committed_only, settle=3)
    for w in workers:
        if w.alive():
            assert w.terminate() == 0, w.tail()
    regressions = sampler.stop()
    ordered = in_partition_order(results)
    lost, duplicated = summary(name, ids, ids_of(results),
                               extra=f" commit-regressions={len(regressions)} in-order={ordered}")
    assert lost == 0
    assert not regressions, regressions
    assert ordered
    assert sampler.last == {p: count for p, count in enumerate(partition_counts(settings, topics.input, 4))}
    return duplicated


def partition_counts(settings, topic: str, partitions: int) -> list[int]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(**settings.client_config("faults-ends"))
    ends = consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
    consumer.close()
    return [ends[TopicPartition(topic, p)] for p in range(partitions)]


@pytest.mark.parametrize("kafka_client", CLIENTS_LONG)
def test_scale_storm_at_least_once(tiny_artifact, topics, env, kafka_settings, tmp_path, summary):
    storm(tiny_artifact, topics, env, kafka_settings, tmp_path, summary, "scale storm (at-least-once)")


@pytest.mark.parametrize("kafka_client", CLIENTS_LONG)
def test_scale_storm_exactly_once_small_caps(tiny_artifact, topics, env, kafka_settings, tmp_path, summary):
    duplicated = storm(tiny_artifact, topics, env, kafka_settings, tmp_path, summary,
                       "scale storm (exactly-once, small caps)", "--guarantee", "exactly-once",
                       "--max-in-flight", "128", "--max-batch-size", "16")
    assert duplicated == 0


@pytest.mark.long
@pytest.mark.parametrize("kafka_client", CLIENTS)
def test_scale_storm_at_least_once_small_caps(tiny_artifact, topics, env, kafka_settings, tmp_path, summary):
    storm(tiny_artifact, topics, env, kafka_settings, tmp_path, summary, "scale storm (at-least-once, small caps)",
          "--max-in-flight", "128", "--max-batch-size", "16")


@pytest.mark.long
@pytest.mark.parametrize("kafka_client", CLIENTS)
def test_scale_storm_exactly_once(tiny_artifact, topics, env, kafka_settings, tmp_path, summary):
    duplicated = storm(tiny_artifact, topics, env, kafka_settings, tmp_path, summary,
                       "scale storm (exactly-once)", "--guarantee", "exactly-once")
    assert duplicated == 0


@pytest.mark.parametrize("kafka_client", CLIENTS_LONG)
@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_output_topic_missing_for_20s(tiny_artifact, topics, env, kafka_settings, summary, tmp_path, guarantee):
    """A refusal that passes: the output topic is deleted, then created again 20 s later. Nothing is
    committed past what was published, nothing is lost, each partition stays in order."""
    from kafka.admin import NewTopic

    topics.create(partitions=2)
    vals, keys, ids = reviews(3000, "o")
    admin = KafkaAdminClient(**kafka_settings.client_config("faults-admin"))
    with start(tiny_artifact, topics, env, "--guarantee", guarantee, metrics_port=free_port(),
               log=tmp_path / "w.log") as worker:
        worker.wait_ready()
        publish(kafka_settings, topics.input, vals[:1000], keys[:1000])
        read(kafka_settings, topics.output, 1000, timeout=60, committed_only=True)
        admin.delete_topics([topics.output])
        time.sleep(3)
        before = committed_total(kafka_settings, topics.group, topics.input, 2)
        publish(kafka_settings, topics.input, vals[1000:], keys[1000:])
        time.sleep(20)
        assert committed_total(kafka_settings, topics.group, topics.input, 2) == before, "committed unsent"
        assert worker.alive(), worker.tail()
        admin.create_topics([NewTopic(topics.output, 1, -1)])
        results = read(kafka_settings, topics.output, 2000, timeout=180, committed_only=True, settle=2)
        assert worker.terminate() == 0, worker.tail()
    admin.close()
    lost, duplicated = summary(f"output topic missing 20 s ({guarantee})", ids - set(ids_of_first(vals[:1000])),
                               ids_of(results))
    assert lost == 0
    assert in_partition_order(results)
    if guarantee == "exactly-once":
        assert duplicated == 0


def ids_of_first(values: list[bytes]) -> list[str]:
    return [json.loads(v)["id"] for v in values]


@pytest.mark.parametrize("kafka_client", CLIENTS)
@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_a_result_too_large_for_the_output_topic_is_dead_lettered(tiny_artifact, topics, env, kafka_settings,
                                                                   local_broker, summary, tmp_path, guarantee):
    """A refusal that never passes: results over the output topic's max.message.bytes become
    `output_rejected` dead letters; everything else is classified, in partition order."""
    topics.create(partitions=2)
    broker(local_broker, "topic-config", topics.output, "--add-config", "max.message.bytes=4000")
    vals, keys, ids = reviews(1500, "x")
    big = {f"x{i}" for i in range(0, 1500, 100)}
    vals = [json.dumps({**json.loads(v), "notes": "n" * 6000}).encode() if json.loads(v)["id"] in big else v
            for v in vals]
    publish(kafka_settings, topics.input, vals, keys)
    with start(tiny_artifact, topics, env, "--guarantee", guarantee, log=tmp_path / "w.log") as worker:
        results = read(kafka_settings, topics.output, len(ids) - len(big), timeout=120, committed_only=True, settle=2)
        dead = read(kafka_settings, topics.dlq, len(big), timeout=60, committed_only=True, settle=2)
        assert worker.alive(), worker.tail()
    dead_bodies = [json.loads(r.value) for r in dead]
    rejected = {json.loads(base64.b64decode(d["value_b64"]))["id"] for d in dead_bodies}
    lost, _ = summary(f"results too large for the output ({guarantee})", ids - big, ids_of(results), len(dead))
    assert lost == 0 and rejected == big
    assert {d["error"] for d in dead_bodies} == {"output_rejected"}
    assert not big & set(ids_of(results))
    assert in_partition_order(results)


@pytest.mark.parametrize("kafka_client", CLIENTS_LONG)
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
                             text=True, timeout=90)
    assert refused.returncode != 0 and time.monotonic() - started < GIVES_UP_S
    assert "credentials" in refused.stderr.strip().splitlines()[-1] and "Traceback" not in refused.stderr
    for text in (log.read_text(), scrape, produced.stderr, produced.stdout):
        assert password not in text
    assert wrong not in refused.stderr + refused.stdout
