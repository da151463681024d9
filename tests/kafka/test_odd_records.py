"""No record stops the stream, against a real broker: odd records (bytes, JSON, headers, batches
that kafka-python cannot read), every compression codec, and a model that fails on some records
(tests/fake_device.py) or on all of them (a broken device)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from collections import Counter

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from ops.harness import WorkerProcess, publish, read
from tests.kafka.test_worker import bodies, committed

LABEL = "label"
CODECS = ("snappy", "zstd", "lz4", "gzip", "none")

ODD_VALUES = [  # (what, value, expected outcome)
    ("lone surrogate id", b'{"text": "fine movie", "id": "\\udc00"}', "invalid_utf8"),
    ("lone surrogate text", b'{"text": "fine \\ud800 movie"}', "invalid_utf8"),
    ("lone surrogate meta key", b'{"text": "fine", "\\udfff": [1]}', "invalid_utf8"),
    ("NaN", b'{"text": "fine", "stars": NaN}', "invalid_json"),
    ("Infinity", b'{"text": "fine", "stars": -Infinity}', "invalid_json"),
    ("1e999", b'{"text": "fine", "stars": 1e999}', "invalid_json"),
    ("nesting 5000 deep", b'{"text": "fine", "m": ' + b"[" * 5000 + b"]" * 5000 + b"}", "invalid_json"),
    ("number id", b'{"text": "fine", "id": 42}', "bad_type"),
    ("null id", b'{"text": "fine", "id": null}', "bad_type"),
    ("object id", b'{"text": "fine", "id": {"id": "x"}}', "bad_type"),
    ("BOM", b'\xef\xbb\xbf{"id": "bom", "text": "a fine film"}', LABEL),
    ("empty text", b'{"text": ""}', "empty_text"),
    ("invisible text", '{"text": " \u200b\u2060\ufeff\u200e "}'.encode(), "empty_text"),
    ("not UTF-8", b"\xff\xfe not UTF-8 \xed\xa0\x80", "invalid_utf8"),
    ("null value", None, "empty_text"),
]


def kcat(bootstrap: str, topic: str, values: list[bytes], *args: str | bytes) -> None:
    """Produce `values` (one per line) to partition 0 with Debian's kcat (librdkafka), waiting for acks."""
    path = shutil.which("kcat")
    if not path:
        pytest.fail("kcat is missing: make test installs it (ops/install-tools)")
    assert all(b"\n" not in v for v in values)
    subprocess.run([path, "-P", "-b", bootstrap, "-t", topic, "-p", "0", *args], input=b"\n".join(values) + b"\n",
                   check=True, timeout=60, capture_output=True)


def good(n: int) -> bytes:
    return json.dumps({"id": f"good-{n}", "text": f"a fine and moving film , number {n}"}).encode()


def wait_committed(settings, group: str, topic: str, end: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while (position := committed(settings, group, topic, 1)[0]) < end and time.monotonic() < deadline:
        time.sleep(0.5)
    return position


def outcomes(results: list, dead: list) -> dict[int, list[tuple[str, object]]]:
    """Input offset -> every (label or code, record) published for it."""
    out: dict[int, list[tuple[str, object]]] = {}
    for record in results:
        out.setdefault(json.loads(record.value)["source"]["offset"], []).append((LABEL, record))
    for record in dead:
        out.setdefault(json.loads(record.value)["source"]["offset"], []).append(
            (json.loads(record.value)["error"], record))
    return out


def test_each_odd_record_is_one_output_and_the_good_one_after_it_is_classified(
        tiny_artifact, topics, env, kafka_settings, kafka_bootstrap, tmp_path, summary_line):
    topics.create()
    sent: list[tuple[str, str]] = []  # (what, expected outcome), in offset order
    pending: list[tuple[bytes | None, bytes]] = []  # kafka-python's values and keys, sent before each kcat call

    def flush() -> None:
        if pending:
            publish(kafka_settings, topics.input, [v for v, _ in pending], keys=[k for _, k in pending])
            pending.clear()

    def then_good() -> None:
        pending.append((good(len(sent)), b"good"))
        sent.append((f"good-{len(sent)}", LABEL))

    for what, value, expected in ODD_VALUES:
        pending.append((value, what.encode()))
        sent.append((what, expected))
        then_good()
    flush()
    kcat(kafka_bootstrap, topics.input, [b'{"id": "null-header", "text": "a fine film"}'], "-H", "name")
    sent.append(("null header value", LABEL))
    then_good()
    flush()
    kcat(kafka_bootstrap, topics.input, [b'{"text": "a fine film"}'], "-H", b"\xff=v")
    sent.append(("header name not UTF-8", "internal_error"))  # kafka-python cannot decode its batch
    then_good()
    flush()
    kcat(kafka_bootstrap, topics.input, [good(100), b'{"text": "fine", "stars": NaN}', good(101)], "-z", "snappy")
    sent += [("good-100 (snappy)", LABEL), ("NaN (snappy)", "invalid_json"), ("good-101 (snappy)", LABEL)]
    then_good()
    flush()

    labels = sum(expected == LABEL for _, expected in sent)
    with WorkerProcess(tiny_artifact, topics, "--device", "cpu", env=env, log=tmp_path / "w.log") as worker:
        results = read(kafka_settings, topics.output, labels, timeout=120, settle=2)
        dead = read(kafka_settings, topics.dlq, len(sent) - labels, timeout=30, settle=1)
        position = wait_committed(kafka_settings, topics.group, topics.input, len(sent))
        assert worker.alive(), worker.tail()
        assert worker.terminate() == 0, worker.tail()
    got = outcomes(results, dead)
    lost = [sent[o][0] for o in range(len(sent)) if o not in got]
    duplicated = sum(len(v) - 1 for v in got.values())
    codes = Counter(code for v in got.values() for code, _ in v if code != LABEL)
    summary_line(f"odd records: sent={len(sent)} classified={len(results)} dead-lettered={len(dead)} "
                 f"lost={len(lost)} duplicated={duplicated} committed={position} worker=alive "
                 f"codes={dict(sorted(codes.items()))}")
    assert not lost and not duplicated, lost
    assert set(got) == set(range(len(sent)))
    wrong = [(offset, what, expected, got[offset][0][0]) for offset, (what, expected) in enumerate(sent)
             if got[offset][0][0] != expected]
    assert not wrong, wrong
    assert position == len(sent)
    by_id = {json.loads(r.value)["id"]: r for r in results}
    assert by_id["null-header"].headers == [("name", b"")], "a null header value is copied as an empty one"
    assert {"bom"} | {what.split()[0] for what, _ in sent if what.startswith("good-")} <= set(by_id)
    unreadable = next(json.loads(r.value) for r in dead if json.loads(r.value)["error"] == "internal_error")
    assert "cannot read" in unreadable["detail"] and unreadable["value_size"] == 0
    for record in results + dead:
        json.loads(record.value.decode("utf-8"), parse_constant=lambda name: pytest.fail(f"{name} published"))


def test_every_compression_codec_is_classified(tiny_artifact, topics, env, kafka_settings, kafka_bootstrap, tmp_path):
    topics.create()
    ids = []
    for codec in CODECS:
        values = [json.dumps({"id": f"{codec}-{i}", "text": f"a {codec} film , {i} times good"}).encode()
                  for i in range(25)]
        kcat(kafka_bootstrap, topics.input, values, "-z", codec)
        ids += [f"{codec}-{i}" for i in range(25)]
    with WorkerProcess(tiny_artifact, topics, "--device", "cpu", env=env, log=tmp_path / "w.log") as worker:
        results = read(kafka_settings, topics.output, len(ids), timeout=120, settle=1)
        dead = read(kafka_settings, topics.dlq, 1, timeout=2)
        assert worker.alive(), worker.tail()
    assert not dead, [json.loads(d.value)["detail"] for d in dead[:3]]
    assert sorted(b["id"] for b in bodies(results)) == sorted(ids)


def fake_device(tiny_artifact, topics, env, tmp_path, **faults: str) -> WorkerProcess:
    return WorkerProcess(tiny_artifact, topics, "--device", "cpu", "--max-batch-size", "8",
                         env=dict(env, **faults), log=tmp_path / "w.log", module="tests.fake_device")


def test_a_model_failing_on_some_reviews_dead_letters_only_those(tiny_artifact, topics, env, kafka_settings, tmp_path):
    topics.create()
    marked = {7: "terrible", 8: "terrible", 20: "lifeless", 33: "lifeless"}  # words the tiny tokenizer knows
    values = [json.dumps({"id": f"r{i}", "text": f"a wonderful {marked.get(i, 'moving')} film , take {i}"}).encode()
              for i in range(40)]
    publish(kafka_settings, topics.input, values)
    with fake_device(tiny_artifact, topics, env, tmp_path, FAKE_DEVICE_RAISE_ON="terrible",
                     FAKE_DEVICE_NAN_ON="lifeless") as worker:
        results = read(kafka_settings, topics.output, 40 - len(marked), timeout=120, settle=2)
        dead = read(kafka_settings, topics.dlq, len(marked), timeout=30, settle=1)
        assert worker.alive(), worker.tail()
    assert sorted(b["id"] for b in bodies(results)) == sorted(f"r{i}" for i in range(40) if i not in marked)
    assert all(0.0 <= b["score"] <= 1.0 for b in bodies(results))
    letters = {b["source"]["offset"]: b for b in bodies(dead)}
    assert set(letters) == set(marked) and {b["error"] for b in letters.values()} == {"model_error"}
    assert "device-side assert" in letters[7]["detail"] and "non-finite" in letters[20]["detail"]
    assert json.loads(base64.b64decode(letters[33]["value_b64"]))["id"] == "r33"


def test_a_broken_device_exits_non_zero_with_nothing_committed_or_dead_lettered(
        tiny_artifact, topics, env, kafka_settings, tmp_path):
    topics.create()
    publish(kafka_settings, topics.input, [good(i) for i in range(30)])
    tp = TopicPartition(topics.input, 0)
    group = KafkaConsumer(**kafka_settings.client_config("tests-commit"), group_id=topics.group,
                          enable_auto_commit=False)
    group.assign([tp])
    group.commit({tp: OffsetAndMetadata(10, "", -1)})  # an earlier worker got this far
    group.close()
    with fake_device(tiny_artifact, topics, env, tmp_path, FAKE_DEVICE_BROKEN="1") as worker:
        code = worker.proc.wait(timeout=120)
    assert code == 3, worker.tail()
    assert "device is broken" in worker.tail()
    assert committed(kafka_settings, topics.group, topics.input, 1) == {0: 10}
    assert not read(kafka_settings, topics.output, 1, timeout=3)
    assert not read(kafka_settings, topics.dlq, 1, timeout=3)
