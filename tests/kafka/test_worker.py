"""The worker against a real broker with a tiny model: results, dead letters, caps, latency,
delivery guarantees under SIGKILL, consumer-group sharing, graceful stop and user errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from kafka import KafkaAdminClient, KafkaProducer, TopicPartition
from kafka.errors import KafkaTimeoutError

from ops.harness import WorkerProcess, free_port, publish, read
from tests.conftest import CLIENTS, CLIENTS_LONG, GIVES_UP_S, ROOT


def start(artifact, topics, env, *args, **kwargs) -> WorkerProcess:
    return WorkerProcess(artifact, topics, "--device", "cpu", *args, env=env, **kwargs)


def reviews(n: int, prefix: str = "r") -> tuple[list[bytes], list[bytes], list[str]]:
    ids = [f"{prefix}{i}" for i in range(n)]
    vals = [json.dumps({"id": i, "text": f"review {i} : " + "a fine film " * (1 + i.__len__() % 5 + k % 7)}).encode()
            for k, i in enumerate(ids)]
    return vals, [i.encode() for i in ids], ids


def bodies(records: list) -> list[dict]:
    return [json.loads(r.value) for r in records]


def histogram_within(metrics_text: str, name: str, cap: int) -> bool:
    """Every observation of histogram `name` is <= cap (its le=cap bucket equals its count)."""
    lines = dict(line.rsplit(" ", 1) for line in metrics_text.splitlines() if line.startswith(name))
    return float(lines[f'{name}_bucket{{le="{float(cap)}"}}']) == float(lines[f"{name}_count"]) > 0


def metric(metrics_text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines()
               if line.startswith((name + " ", name + "{")))


def committed(settings, group: str, topic: str, partitions: int) -> dict[int, int]:
    admin = KafkaAdminClient(**settings.client_config("tests-offsets"))
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    got = admin.list_group_offsets({group: tps}).get(group, {})
    admin.close()
    return {tp.partition: max(0, got[tp].offset) if tp in got else 0 for tp in tps}


def stream(settings, topic, vals, keys, seconds) -> threading.Thread:
    """Publish in the background at a steady pace over `seconds`."""
    thread = threading.Thread(target=publish, args=(settings, topic, vals, keys), daemon=True,
                              kwargs={"rate": len(vals) / seconds})
    thread.start()
    return thread


@pytest.mark.parametrize("kafka_client", CLIENTS)
def test_results_dead_letters_caps_and_order(tiny_artifact, topics, env, kafka_settings, tmp_path):
    topics.create(partitions=2)
    vals, keys, ids = reviews(2000)
    malformed = {b"\xff\xfe\xfa": "invalid_utf8", b'{"text": "unterminated': "invalid_json",
                 b'{"body": "no text"}': "missing_text", b'{"text": "   "}': "empty_text", None: "empty_text",
                 b'{"text": 7}': "bad_type", b"x" * 5000: "too_large"}
    bad = list(malformed)
    mixed = vals[:1000] + bad + vals[1000:] + [b"[1, 2"]  # the last is plain text by the contract
    publish(kafka_settings, topics.input, mixed, [b"k%d" % i for i in range(len(mixed))],
            headers=[("trace", b"t-1")])
    port = free_port()
    with start(tiny_artifact, topics, env, "--max-batch-size", "16", "--max-batch-tokens", "512",
               "--max-record-bytes", "4096", metrics_port=port, log=tmp_path / "w.log") as worker:
        results = read(kafka_settings, topics.output, 2001, timeout=120, settle=2)
        dead = read(kafka_settings, topics.dlq, len(bad), timeout=30, settle=1)
        assert worker.alive(), worker.tail()
        scrape = worker.metrics()
    out = bodies(results)
    assert len(out) == 2001
    plain = [b for b in out if b["id"] not in set(ids)]
    assert len(plain) == 1 and plain[0]["id"] == "{topic}:{partition}:{offset}".format(**plain[0]["source"])
    assert {b["id"] for b in out} - {plain[0]["id"]} == set(ids)
    assert Counter(d["error"] for d in bodies(dead)) == Counter(malformed.values())
    assert all(r.headers == [("trace", b"t-1")] for r in results[:5] + dead)
    assert all(b["label"] in ("positive", "negative") and 0 <= b["score"] <= 1 for b in out)
    head_sha = json.loads((tiny_artifact / "manifest.json").read_text())["head_sha256"]
    assert {b["model"] for b in out} == {f"tiny@{head_sha[:12]}"}
    for partition in (0, 1):
        offsets = [b["source"]["offset"] for b in out if b["source"]["partition"] == partition]
        assert offsets == sorted(offsets), "results must keep their input partition's order"
    too_large = next(d for d in bodies(dead) if d["error"] == "too_large")
    assert too_large["value_size"] == 5000
    assert histogram_within(scrape, "sentiment_worker_batch_size", 16)
    assert histogram_within(scrape, "sentiment_worker_batch_tokens", 512)
    assert metric(scrape, "sentiment_worker_messages_classified_total") == 2001
    assert metric(scrape, "sentiment_worker_messages_dead_lettered_total") == len(bad)
    assert metric(scrape, "sentiment_worker_messages_consumed_total") == len(mixed)


@pytest.mark.parametrize("kafka_client", CLIENTS)
def test_lone_record_on_idle_topic_comes_out_within_two_seconds(tiny_artifact, topics, env, kafka_settings):
    topics.create()
    with start(tiny_artifact, topics, env, "--max-wait-ms", "25", metrics_port=free_port()) as worker:
        worker.wait_ready()
        time.sleep(2)  # idle: the consumer sits in its fetch wait
        sent = time.time()
        publish(kafka_settings, topics.input, [b'{"id": "lone", "text": "a quiet good film"}'])
        [result] = read(kafka_settings, topics.output, 1, timeout=10)
    body = json.loads(result.value)
    assert body["id"] == "lone"
    assert body["classified_at"] - sent < 2.0, f"took {body['classified_at'] - sent:.3f}s"


@pytest.mark.parametrize("kafka_client", [pytest.param("kafka-python", marks=pytest.mark.long), "confluent"])
def test_a_record_the_client_cannot_read_is_dead_lettered(tiny_artifact, topics, env, kafka_settings, tmp_path):
    """A header name that is not UTF-8 (written with kcat) is a record neither client can decode: it becomes
    an `internal_error` dead letter with its offset, and the records around it are classified."""
    if not shutil.which("kcat"):
        pytest.skip("needs kcat (make tools)")
    topics.create()
    vals, keys, ids = reviews(40)
    publish(kafka_settings, topics.input, vals[:20], keys[:20])
    subprocess.run(["kcat", "-b", kafka_settings.bootstrap_servers, "-P", "-t", topics.input, "-H", b"\xff\xfe=v"],
                   input=b'{"id": "bad-header", "text": "a fine film"}', check=True, timeout=30)
    publish(kafka_settings, topics.input, vals[20:], keys[20:])
    with start(tiny_artifact, topics, env, log=tmp_path / "w.log") as worker:
        results = read(kafka_settings, topics.output, 40, timeout=90, settle=1)
        [dead] = bodies(read(kafka_settings, topics.dlq, 1, timeout=30, settle=1))
        assert worker.alive(), worker.tail()
    assert sorted(b["id"] for b in bodies(results)) == sorted(ids)
    assert dead["error"] == "internal_error" and dead["source"]["offset"] == 20, dead


def kill_loop(artifact, topics, env, settings, tmp_path, *extra):
    topics.create(partitions=2)
    vals, keys, ids = reviews(5000)
    producer = stream(settings, topics.input, vals, keys, seconds=10)
    log = tmp_path / "worker.log"
    args = ("--max-batch-size", "32", *extra)
    for _ in range(3):
        worker = start(artifact, topics, env, *args, log=log)
        time.sleep(3.0)
        assert worker.alive(), worker.tail()
        worker.kill()
    producer.join()
    with start(artifact, topics, env, *args, log=log) as worker:
        exactly_once = "exactly-once" in extra
        results = read(settings, topics.output, 5000, timeout=120, committed_only=exactly_once, settle=3)
        assert worker.terminate() == 0, worker.tail()
    got = Counter(b["id"] for b in bodies(results))
    lost = set(ids) - set(got)
    duplicates = sum(got.values()) - len(got)
    print(f"\nsummary: sent=5000 classified={len(got)} lost={len(lost)} duplicated={duplicates} {extra}")
    assert not lost, f"{len(lost)} lost"
    return duplicates


@pytest.mark.parametrize("kafka_client", CLIENTS_LONG)
def test_sigkill_three_times_at_least_once_loses_nothing(tiny_artifact, topics, env, kafka_settings, tmp_path):
    duplicates = kill_loop(tiny_artifact, topics, env, kafka_settings, tmp_path)
    assert duplicates <= 3 * 32


@pytest.mark.parametrize("kafka_client", CLIENTS)
def test_sigkill_three_times_exactly_once_has_no_duplicates(tiny_artifact, topics, env, kafka_settings, tmp_path):
    duplicates = kill_loop(tiny_artifact, topics, env, kafka_settings, tmp_path,
                           "--guarantee", "exactly-once", "--instance-id", "w0")
    assert duplicates == 0


def both_consume(a, b, timeout: float) -> tuple[float, float]:
    """Each worker's consumed count once both consume (ready means joined: the group may still be settling)."""
    deadline = time.monotonic() + timeout
    counts = (0.0, 0.0)
    while time.monotonic() < deadline and not all(counts):
        time.sleep(0.5)
        counts = tuple(w.metric("sentiment_worker_messages_consumed_total") for w in (a, b))
    return counts


@pytest.mark.parametrize("kafka_client", CLIENTS_LONG)
def test_two_workers_share_partitions_and_lose_nothing_when_one_stops(tiny_artifact, topics, env,
                                                                       kafka_settings, tmp_path):
    topics.create(partitions=4)
    a = start(tiny_artifact, topics, env, metrics_port=free_port(), log=tmp_path / "a.log")
    b = start(tiny_artifact, topics, env, metrics_port=free_port(), log=tmp_path / "b.log")
    with a, b:
        a.wait_ready()
        b.wait_ready()
        vals, keys, ids = reviews(4000)
        producer = stream(kafka_settings, topics.input, vals, keys, seconds=6)
        consumed_a, consumed_b = both_consume(a, b, timeout=20)
        assert a.terminate() == 0, a.tail()
        producer.join()
        results = read(kafka_settings, topics.output, 4000, timeout=120, settle=2)
    assert consumed_a > 0 and consumed_b > 0, (consumed_a, consumed_b)
    assert set(ids) <= {b["id"] for b in bodies(results)}


@pytest.mark.parametrize("guarantee", ["at-least-once", pytest.param("exactly-once", marks=pytest.mark.long)])
def test_kafka_python_and_confluent_workers_share_one_group(tiny_artifact, topics, env, kafka_settings, tmp_path,
                                                           guarantee):
    """A migration between clients: a kafka-python worker and a confluent worker in one group on 4
    partitions (the same assignor names) both consume; then the kafka-python one stops and the confluent
    one takes its partitions over. Nothing is lost, each partition stays in order."""
    pytest.importorskip("confluent_kafka", reason="the `fast` extra (confluent-kafka) is not installed")
    topics.create(partitions=4)
    args = ("--guarantee", guarantee, "--instance-id")
    old = start(tiny_artifact, topics, dict(env, SENTIMENT_KAFKA_CLIENT="kafka-python"), *args, "old",
                metrics_port=free_port(), log=tmp_path / "old.log")
    new = start(tiny_artifact, topics, dict(env, SENTIMENT_KAFKA_CLIENT="confluent"), *args, "new",
                metrics_port=free_port(), log=tmp_path / "new.log")
    with old, new:
        old.wait_ready()
        new.wait_ready()
        vals, keys, ids = reviews(4000, "m")
        producer = stream(kafka_settings, topics.input, vals, keys, seconds=8)
        consumed_old, consumed_new = both_consume(old, new, timeout=30)
        assert old.terminate() == 0, old.tail()
        producer.join()
        results = read(kafka_settings, topics.output, 4000, timeout=120, committed_only=True, settle=2)
        assert new.terminate() == 0, new.tail()
    assert "Kafka client: kafka-python" in (tmp_path / "old.log").read_text()
    assert "Kafka client: confluent" in (tmp_path / "new.log").read_text()
    assert consumed_old > 0 and consumed_new > 0, (consumed_old, consumed_new)
    got = Counter(b["id"] for b in bodies(results))
    print(f"\nsummary: mixed group ({guarantee}): sent=4000 classified={len(got)} lost={len(set(ids) - set(got))} "
          f"duplicated={sum(got.values()) - len(got)} consumed by kafka-python={consumed_old:.0f} "
          f"by confluent={consumed_new:.0f}")
    assert set(ids) <= set(got)
    for partition in range(4):
        offsets = [b["source"]["offset"] for b in bodies(results) if b["source"]["partition"] == partition]
        assert list(dict.fromkeys(offsets)) == sorted(set(offsets)), f"partition {partition} out of order"
    if guarantee == "exactly-once":
        assert sum(got.values()) == len(got), "duplicates under exactly-once"


@pytest.mark.parametrize("kafka_client", CLIENTS)
def test_sigterm_drains_commits_and_exits_zero(tiny_artifact, topics, env, kafka_settings, tmp_path):
    topics.create(partitions=2)
    vals, keys, ids = reviews(3000)
    publish(kafka_settings, topics.input, vals, keys)
    with start(tiny_artifact, topics, env, log=tmp_path / "w.log") as worker:
        read(kafka_settings, topics.output, 200, timeout=60)
        started = time.monotonic()
        assert worker.terminate(timeout=10) == 0, worker.tail()
        assert time.monotonic() - started < 10
    positions = committed(kafka_settings, topics.group, topics.input, 2)
    results = bodies(read(kafka_settings, topics.output, sum(positions.values()), timeout=30, settle=2))
    done = {(b["source"]["partition"], b["source"]["offset"]) for b in results}
    assert len(results) == len(done) == sum(positions.values()), "exactly what was committed was published"
    assert done == {(p, o) for p, end in positions.items() for o in range(end)}
    with start(tiny_artifact, topics, env, log=tmp_path / "w.log"):
        rest = bodies(read(kafka_settings, topics.output, 3000, timeout=120, settle=2))
    assert len(rest) == 3000 and {b["id"] for b in rest} == set(ids), "no loss and no duplicates after restart"


def run_worker(env, *args, timeout=90):
    return subprocess.run([sys.executable, "-m", "worker", "--metrics-port", "0", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(result, started, contains):
    assert result.returncode != 0 and time.monotonic() - started < GIVES_UP_S
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and contains in last, result.stderr[-1500:]
    assert "Traceback" not in result.stderr


def test_user_errors_end_in_one_line(tiny_artifact, env, tmp_path):
    started = time.monotonic()
    one_line_error(run_worker(dict(env, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1"), "--model", str(tiny_artifact)),
                   started, "cannot reach Kafka")
    started = time.monotonic()
    one_line_error(run_worker(env, "--model", str(tmp_path / "none")), started, "no model artifact")
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    (tampered / "manifest.json").write_text((tiny_artifact / "manifest.json").read_text())
    (tampered / "head.joblib").write_bytes((tiny_artifact / "head.joblib").read_bytes()[:-1] + b"\x01")
    started = time.monotonic()
    one_line_error(run_worker(env, "--model", str(tampered)), started, "does not match the manifest")


def broker_creates_topics(settings) -> bool:
    producer = KafkaProducer(**settings.client_config("tests"), max_block_ms=3000)
    try:
        producer.partitions_for(f"auto-create-probe-{time.time_ns()}")
        return True
    except KafkaTimeoutError:
        return False
    finally:
        producer.close(timeout=1)


@pytest.mark.parametrize("kafka_client", CLIENTS)
def test_missing_topic_is_a_clear_error_when_the_broker_does_not_create_topics(tiny_artifact, topics, env,
                                                                                kafka_settings):
    if broker_creates_topics(kafka_settings):
        pytest.skip("this broker creates topics on first use (make test runs one that does not)")
    started = time.monotonic()
    one_line_error(run_worker(env, "--model", str(tiny_artifact), *topics.worker_args()), started, "does not exist")
