"""The producer against a real broker: every row arrives, rate limiting, SASL, kcat interoperability."""

import json
import shutil
import subprocess
import time

import pytest

from contract.records import Review, Source, decode_review
from ops.harness import read
from tests.conftest import GIVES_UP_S, ROOT, sasl_env


def run_producer(python, env, *args, timeout=300):
    return subprocess.run([python, "-m", "producer", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def summary(result):
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_sst2_row_is_published_and_read_back(python, env, topics, kafka_settings, sst2_dir):
    expected = {}
    for split in ("train", "dev"):
        lines = (sst2_dir / f"{split}.tsv").read_text().splitlines()
        expected.update({f"{split}-{n}": line.rsplit("\t", 1)[0] for n, line in enumerate(lines, 1) if line})
        result = summary(run_producer(python, env, "--topic", topics.input, "--input", str(sst2_dir / f"{split}.tsv"),
                                      "--id-prefix", f"{split}-", "--partitions", "3", "--compression", "lz4"))
        assert result["failed"] == 0 and result["acknowledged"] == result["sent"] == len(lines)
    topics.created.append(topics.input)
    assert len(expected) == 7792
    records = read(kafka_settings, topics.input, len(expected), timeout=120, settle=1.0)
    assert len(records) == len(expected)
    got = {}
    for record in records:
        review = decode_review(record.value, Source(record.topic, record.partition, record.offset))
        assert isinstance(review, Review) and record.key.decode() == review.id
        got[review.id] = review.text
    assert got == expected


def test_rate_limit_holds_within_twenty_percent(python, env, topics, sst2_dir):
    result = summary(run_producer(python, env, "--topic", topics.input, "--input", str(sst2_dir / "dev.tsv"),
                                  "--rate", "200", "--limit", "2000", "--repeat", "3"))
    topics.created.append(topics.input)
    assert result["acknowledged"] == 2000
    assert 160 <= result["msgs_per_s"] <= 240, result


def test_bad_rows_are_skipped_with_line_numbers(python, env, topics, tmp_path):
    data = tmp_path / "mixed.jsonl"
    data.write_text('{"text": "fine film", "id": "a"}\n{oops\n{"text": "awful", "id": "b"}\n')
    result = run_producer(python, env, "--topic", topics.input, "--input", str(data))
    topics.created.append(topics.input)
    assert summary(result)["skipped_rows"] == 1 and "mixed.jsonl:2" in result.stderr


def test_missing_input_and_unreachable_broker_are_one_line_errors(python, env, topics, tmp_path):
    missing = run_producer(python, env, "--input", str(tmp_path / "none.tsv"))
    assert missing.returncode != 0 and missing.stderr.strip().splitlines()[-1].startswith("error: input file")
    data = tmp_path / "one.txt"
    data.write_text("hello\n")
    started = time.monotonic()
    away = run_producer(python, dict(env, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1"), "--input", str(data), timeout=90)
    assert away.returncode != 0 and time.monotonic() - started < GIVES_UP_S
    assert away.stderr.strip().splitlines()[-1].startswith("error: cannot reach Kafka")
    assert "Traceback" not in away.stderr


def test_sasl_scram_right_and_wrong_credentials(python, env, topics, tmp_path):
    data = tmp_path / "r.txt"
    data.write_text("a fine film\na dull film\n")
    good = run_producer(python, sasl_env(env, "sentiment-secret"), "--topic", topics.input, "--input", str(data))
    topics.created.append(topics.input)
    assert summary(good)["acknowledged"] == 2
    started = time.monotonic()
    wrong = "not-the-password-xyz"
    bad = run_producer(python, sasl_env(env, wrong), "--topic", topics.input, "--input", str(data), timeout=90)
    assert bad.returncode != 0 and time.monotonic() - started < GIVES_UP_S
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "credentials" in last
    assert wrong not in bad.stderr + bad.stdout and "Traceback" not in bad.stderr


def test_records_from_kcat_are_decoded(kafka_settings, kafka_bootstrap, topics):
    kcat = shutil.which("kcat")
    if not kcat:
        pytest.fail("kcat is missing: make test installs it (ops/install-tools)")
    topics.create()
    lines = "plain text review from kcat\n" + json.dumps({"id": "k1", "text": "json review", "stars": 4}) + "\n"
    subprocess.run([kcat, "-P", "-b", kafka_bootstrap, "-t", topics.input, "-k", "kc"], input=lines.encode(),
                   check=True, timeout=30)
    records = read(kafka_settings, topics.input, 2, timeout=30)
    decoded = [decode_review(r.value, Source(r.topic, r.partition, r.offset)) for r in records]
    assert decoded[0] == Review(f"{topics.input}:0:0", "plain text review from kcat", None)
    assert decoded[1] == Review("k1", "json review", {"stars": 4})
    assert records[0].key == b"kc"
