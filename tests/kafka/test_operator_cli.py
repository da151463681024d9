"""What an operator does from the command line, against the real broker: a client.properties file with
SASL settings, `--check` before a deploy, JSON logs, and replaying dead letters after a fix."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, TopicPartition

from ops.harness import WorkerProcess, free_port, publish, read
from producer.replay import REPLAYED_FROM
from tests.conftest import GIVES_UP_S, ROOT

SASL_PASSWORD = "sentiment-secret"  # the local broker's SCRAM user (ops/kafka/local-broker)


def script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run(env, *cmd, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def sasl_bootstrap() -> str:
    bootstrap = os.environ.get("KAFKA_SASL_BOOTSTRAP")
    if not bootstrap:
        pytest.skip("the SASL/SCRAM listener comes with the local broker (make test)")
    return bootstrap


def properties_env(env, tmp_path, password: str, extra: str = "") -> dict[str, str]:
    """`env` with the Kafka settings in a client.properties file only (Java style, SCRAM via sasl.jaas.config)."""
    path = tmp_path / "client.properties"
    path.write_text(f"# as a Kafka user has it\nbootstrap.servers={sasl_bootstrap()}\n"
                    "security.protocol=SASL_PLAINTEXT\nsasl.mechanism=SCRAM-SHA-512\nsasl.jaas.config=org.apache.kafka.common.security.scram."
                    f'ScramLoginModule required username="sentiment" password="{password}";\n{extra}')
    child = {k: v for k, v in env.items() if not k.startswith("KAFKA_")}
    return dict(child, KAFKA_CONFIG_FILE=str(path))


def committed_offsets(settings, group: str, topic: str) -> dict:
    admin = KafkaAdminClient(**settings.client_config("tests-offsets"))
    try:
        return admin.list_group_offsets({group: [TopicPartition(topic, 0)]}).get(group, {})
    finally:
        admin.close()


# -- client.properties ------------------------------------------------------------------------------


def test_a_properties_file_with_sasl_settings_reaches_the_sasl_listener(env, topics, kafka_settings, tmp_path):
    data = tmp_path / "r.txt"
    data.write_text("a fine film\na dull film\n")
    good = run(properties_env(env, tmp_path, SASL_PASSWORD), script("sentiment-producer"), "--topic", topics.input,
               "--input", str(data))
    topics.created.append(topics.input)
    assert good.returncode == 0, good.stderr[-2000:]
    assert json.loads(good.stdout.strip().splitlines()[-1])["acknowledged"] == 2
    texts = sorted(json.loads(r.value)["text"] for r in read(kafka_settings, topics.input, 2, timeout=30))
    assert texts == ["a dull film", "a fine film"]

    wrong = "wrong-password-in-file-123"
    started = time.monotonic()
    bad = run(properties_env(env, tmp_path, wrong), script("sentiment-producer"), "--topic", topics.input,
              "--input", str(data), timeout=60)
    assert bad.returncode != 0 and time.monotonic() - started < GIVES_UP_S
    assert last_line(bad).startswith("error:") and "credentials" in last_line(bad)
    assert wrong not in bad.stdout + bad.stderr and "Traceback" not in bad.stderr

    fixed = dict(properties_env(env, tmp_path, wrong), KAFKA_SASL_PASSWORD=SASL_PASSWORD)  # the variable wins
    assert run(fixed, script("sentiment-producer"), "--topic", topics.input, "--input", str(data)).returncode == 0


def test_an_unknown_key_in_the_properties_file_is_refused_in_one_line(env, tmp_path):
    data = tmp_path / "r.txt"
    data.write_text("a fine film\n")
    result = run(properties_env(env, tmp_path, SASL_PASSWORD, extra="linger.ms=5\n"), script("sentiment-producer"),
                 "--input", str(data), timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "'linger.ms'" in result.stderr and "kafka-python" in result.stderr
    assert SASL_PASSWORD not in result.stderr


# -- sentiment-worker --check ----------------------------------------------------------------------------


def check(env, artifact, topics, *args, timeout=180):
    return run(env, script("sentiment-worker"), "--check", "--model", str(artifact), "--device", "cpu",
               *topics.worker_args(), *args, timeout=timeout)


def test_check_passes_and_consumes_nothing(env, tiny_artifact, topics, kafka_settings):
    topics.create()
    publish(kafka_settings, topics.input, [b"a fine film", b"a dull film"])
    result = check(env, tiny_artifact, topics)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "ok    model", "ok    kafka", f"ok    input topic {topics.input}", f"ok    output topic {topics.output}",
        f"ok    dead-letter topic {topics.dlq}", f"ok    group {topics.group}", "check passed"]
    assert "joined (1 partition(s) assigned" in lines[5] and "1 partition(s)" in lines[2]
    assert all(o.offset < 0 for o in committed_offsets(kafka_settings, topics.group, topics.input).values())
    assert len(read(kafka_settings, topics.output, 1, timeout=3)) == 0  # nothing classified


def test_check_fails_on_a_missing_topic_and_a_missing_model(env, tiny_artifact, topics, tmp_path):
    topics.create()
    missing = check(env, tiny_artifact, topics, "--dlq-topic", topics.dlq + ".absent")
    assert missing.returncode == 1
    assert f"FAIL  dead-letter topic {topics.dlq}.absent: missing" in missing.stdout
    assert missing.stdout.strip().splitlines()[-1] == "check failed: 1 problem(s)"
    no_model = check(env, tmp_path / "no-such-artifact", topics)
    assert no_model.returncode == 1 and no_model.stdout.startswith("FAIL  model:")
    assert f"ok    group {topics.group}" in no_model.stdout  # the other checks still ran


def test_check_fails_on_wrong_credentials_without_showing_them(env, tiny_artifact, topics, tmp_path):
    wrong = "not-the-password-456"
    started = time.monotonic()
    result = check(properties_env(env, tmp_path, wrong), tiny_artifact, topics, timeout=180)
    assert result.returncode == 1 and time.monotonic() - started < 120  # model load + 20 s connect timeout, no hang
    kafka_line = next(line for line in result.stdout.splitlines() if line.startswith("FAIL  kafka:"))
    assert "credentials" in kafka_line
    assert wrong not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert not any("topic" in line.split(":")[0] for line in result.stdout.splitlines())  # not tried further


# -- JSON logs --------------------------------------------------------------------------------------------


def test_json_logs_are_one_object_per_line_with_the_instance(env, tiny_artifact, topics, kafka_settings, tmp_path):
    topics.create()
    log = tmp_path / "worker.log"
    with WorkerProcess(tiny_artifact, topics, "--device", "cpu", "--log-format", "json", "--log-level", "info",
                       "--instance-id", "pod-7", env=env, metrics_port=free_port(), log=log) as worker:
        worker.wait_ready()
        publish(kafka_settings, topics.input, [b"a fine film", b"{not json"])
        assert len(read(kafka_settings, topics.output, 1, timeout=60)) == 1
        assert worker.terminate() == 0
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line on stderr is an object
    assert entries and all(e["instance"] == "pod-7" and e["level"] in ("DEBUG", "INFO", "WARNING", "ERROR")
                           for e in entries)
    assert all({"time", "ts", "logger", "message"} <= set(e) for e in entries)
    messages = [e["message"] for e in entries]
    assert any(m.startswith("model ") for m in messages) and "stopped cleanly" in messages
    failed = run(env, script("sentiment-worker"), "--model", str(tmp_path / "none"), "--log-format", "json",
                 "--instance-id", "pod-8")
    assert failed.returncode == 2
    last = json.loads(failed.stderr.strip().splitlines()[-1])  # the error line too
    assert (last["level"], last["instance"]) == ("ERROR", "pod-8") and "no model artifact" in last["message"]


# -- replaying dead letters -------------------------------------------------------------------------------


def dead_letter(code: str, value: bytes, offset: int, kept: int | None = None) -> bytes:
    """A dead letter as DESIGN.md writes it (kept: bytes of the value it still holds)."""
    return json.dumps({"error": code, "detail": f"{code} in a test", "value_size": len(value),
                       "source": {"topic": "reviews", "partition": 0, "offset": offset},
                       "value_b64": base64.b64encode(value[:kept]).decode()}).encode()


def replay(env, topics, *args, timeout=120):
    return run(env, script("sentiment-producer"), "--replay-dlq", topics.dlq, "--topic", topics.input, *args,
               timeout=timeout)


def test_replayed_dead_letters_are_classified_with_their_headers(env, tiny_artifact, topics, kafka_settings):
    topics.create()
    originals = {f"m{i}": json.dumps({"id": f"m{i}", "text": f"a fine film number {i}"}).encode() for i in range(3)}
    letters = [dead_letter("model_error", v, n) for n, v in enumerate(originals.values())]
    letters += [dead_letter("invalid_json", b"{oops", 3),
                dead_letter("internal_error", b"plain text review that hit a bug", 4)]
    keys = [k.encode() for k in originals] + [b"bad", b"p0"]
    publish(kafka_settings, topics.dlq, letters, keys=keys, headers=[("trace", b"t-1")])

    refused = replay(env, topics, "--codes", "model_error,too_large")
    assert refused.returncode == 2 and last_line(refused).startswith("error: too_large dead letters")

    result = replay(env, topics)  # default codes: model_error, output_rejected, internal_error
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["dead_letters"], summary["chosen"], summary["replayed"], summary["truncated"]) == (5, 4, 4, 0)

    replayed = read(kafka_settings, topics.input, 4, timeout=30, settle=1)
    assert sorted(r.key for r in replayed) == sorted([*keys[:3], b"p0"])
    for record in replayed:
        headers = dict(record.headers)
        assert headers["trace"] == b"t-1"
        source = int(headers[REPLAYED_FROM].decode().rsplit(":", 1)[1])
        assert headers[REPLAYED_FROM] == f"{topics.dlq}:0:{source}".encode()
        assert record.value == base64.b64decode(json.loads(letters[source])["value_b64"])

    with WorkerProcess(tiny_artifact, topics, "--device", "cpu", env=env, metrics_port=free_port()) as worker:
        worker.wait_ready()
        results = read(kafka_settings, topics.output, 4, timeout=60, settle=1)
        worker.terminate()
    assert sorted(json.loads(r.value)["id"] for r in results) == sorted([*originals, f"{topics.input}:0:3"])
    assert all(REPLAYED_FROM in dict(r.headers) for r in results)

    since = time.time()
    time.sleep(0.05)
    publish(kafka_settings, topics.dlq, [dead_letter("model_error", b"x" * 70_000, 9, kept=65_536)])
    truncated = replay(env, topics, "--since", f"{since:.3f}")
    summary = json.loads(truncated.stdout.strip().splitlines()[-1])
    assert truncated.returncode == 1 and (summary["dead_letters"], summary["truncated"], summary["replayed"]) == (
        1, 1, 0)
    assert "holds only 65536 of 70000 bytes" in truncated.stderr
    future = replay(env, topics, "--since", "2099-01-01T00:00:00Z")
    assert future.returncode == 0 and json.loads(future.stdout.strip().splitlines()[-1])["dead_letters"] == 0
