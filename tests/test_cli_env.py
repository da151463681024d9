"""Each option is defined once; flags, SENTIMENT_* variables, --help and the README's table follow it;
bad values are refused in one line; the console scripts answer --version."""

import re
import subprocess
import sys
from dataclasses import fields
from importlib import metadata
from pathlib import Path

import pytest

from contract.cli import DTYPE, UserError, options_table
from contract.kafka import KafkaSettings
from models.classifier import BATCH_CAPS, BATCH_OVERHEAD_TOKENS
from producer.__main__ import parser as producer_parser
from tests.conftest import ROOT
from worker.config import OPTIONS, WorkerConfig, parse_args
from worker.config import parser as worker_parser


def test_env_sets_flags_and_flags_win(monkeypatch):
    monkeypatch.setenv("SENTIMENT_MODEL", "models/artifacts/x")
    monkeypatch.setenv("SENTIMENT_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("SENTIMENT_GUARANTEE", "exactly-once")
    monkeypatch.setenv("SENTIMENT_STATIC_MEMBERSHIP", "yes")
    monkeypatch.setenv("SENTIMENT_INSTANCE_ID", "pod-0")
    config = parse_args(["--max-wait-ms", "5"])
    assert (config.model, config.max_batch_size, config.guarantee, config.max_wait_ms) == (
        "models/artifacts/x", 16, "exactly-once", 5)
    assert config.static_membership and config.transactional_id == "sentiment-workers.pod-0"
    assert parse_args(["--max-batch-size", "8"]).max_batch_size == 8


CPU, CUDA = ((*BATCH_CAPS[d], BATCH_OVERHEAD_TOKENS[d]) for d in ("cpu", "cuda"))


def test_batch_caps_left_unset_take_the_devices_defaults():
    """64 / 8192 on a CPU, 256 / 32768 on CUDA (the model's device decides); a cap given keeps its value."""
    unset = parse_args(["--model", "m"])
    assert (unset.max_batch_size, unset.max_batch_tokens) == (None, None)
    cuda = unset.with_batch_caps(*CUDA)
    assert (cuda.max_batch_size, cuda.max_batch_tokens) == (256, 32768)
    assert unset.with_batch_caps(*CPU).max_batch_tokens == 8192
    given = parse_args(["--model", "m", "--max-batch-size", "32"]).with_batch_caps(*CUDA)
    assert (given.max_batch_size, given.max_batch_tokens) == (32, 32768)
    with pytest.raises(UserError, match=r"--max-in-flight \(100\) must be at least --max-batch-size \(256; "):
        parse_args(["--model", "m", "--max-in-flight", "100"]).with_batch_caps(*CUDA)
    assert unset.with_batch_caps(*CPU).batch_overhead_tokens == 64
    zero = parse_args(["--model", "m", "--batch-overhead-tokens", "0"])
    assert zero.with_batch_caps(*CUDA).batch_overhead_tokens == 0
    with pytest.raises(UserError, match="--batch-overhead-tokens cannot be negative"):
        parse_args(["--model", "m", "--batch-overhead-tokens", "-1"])


def test_log_level_and_choices_are_case_insensitive(monkeypatch):
    monkeypatch.setenv("SENTIMENT_LOG_LEVEL", "info")
    assert parse_args(["--model", "m"]).log_level == "INFO"
    config = parse_args(["--model", "m", "--log-level", "Debug", "--guarantee", "EXACTLY-ONCE", "--log-format", "JSON"])
    assert (config.log_level, config.guarantee, config.log_format) == ("DEBUG", "exactly-once", "json")


@pytest.mark.parametrize("name, value", [("SENTIMENT_GUARANTEE", "maybe-once"), ("SENTIMENT_MAX_BATCH_SIZE", "lots"),
                                         ("SENTIMENT_STATIC_MEMBERSHIP", "perhaps")])
def test_a_bad_environment_value_is_one_line_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(UserError) as caught:
        parse_args(["--model", "m"])
    assert str(caught.value).startswith(f"{name}={value!r}: expected") and "\n" not in str(caught.value)


def test_a_bad_flag_value_exits_2_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as caught:
        parse_args(["--model", "m", "--max-wait-ms", "soon"])
    assert caught.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith("argument --max-wait-ms: 'soon': expected an integer")


def test_every_worker_field_is_an_option_with_the_dataclass_default():
    assert [o.name for o in OPTIONS] == [f.name for f in fields(WorkerConfig)]
    assert parse_args(["--model", "m"]) == WorkerConfig(model="m")
    for opt in OPTIONS:
        assert opt.flag == "--" + opt.name.replace("_", "-") and opt.env == "SENTIMENT_" + opt.name.upper()
    assert {o.name: o.kind for o in OPTIONS}["max_batch_size"] is int
    assert {o.name: o.kind for o in OPTIONS}["static_membership"] is bool


def test_help_shows_each_flag_with_its_variable_and_default():
    text = re.sub(r"\s+", " ", worker_parser(env={}).format_help())
    for opt in OPTIONS:
        assert opt.flag in text and opt.env in text
    assert "[env SENTIMENT_MAX_WAIT_MS; default 25]" in text


def test_the_readme_table_is_the_one_the_options_make():
    readme = (ROOT / "README.md").read_text()
    assert options_table(OPTIONS) in readme, (
        "README's worker option table is stale; regenerate it with: python -c 'from contract.cli import "
        "options_table; from worker.config import OPTIONS; print(options_table(OPTIONS))'")


def test_dtype_choices_are_the_encoders():
    from models.encoder import DTYPES

    assert set(DTYPE.choices) == {"auto", *DTYPES}


def test_producer_needs_input_or_replay_and_reads_its_variables():
    args = producer_parser(env={"SENTIMENT_RATE": "2.5", "SENTIMENT_REPLAY_DLQ": "reviews.dlq"}).parse_args([])
    assert (args.rate, args.replay_dlq, args.input) == (2.5, "reviews.dlq", None)
    from producer.__main__ import main

    with pytest.raises(UserError, match="either --input"):
        main(["--input", "x.tsv", "--replay-dlq", "reviews.dlq"])


@pytest.mark.parametrize("script", ["sentiment-worker", "sentiment-producer", "sentiment-models"])
def test_console_scripts_are_installed_and_answer_version(script):
    path = Path(sys.executable).parent / script
    assert path.is_file(), f"{script} is not installed in {path.parent}: pip install -e . (make setup)"
    result = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert "\n" not in line and line.startswith(f"{script} {metadata.version('review-sentiment-stream')} (")
    for package in ("torch", "transformers", "kafka-python"):
        assert f"{package} {metadata.version(package)}" in line


def test_kafka_settings_from_env_never_show_the_password():
    settings = KafkaSettings.from_env({"KAFKA_BOOTSTRAP_SERVERS": "b:9094", "KAFKA_SECURITY_PROTOCOL": "sasl_plaintext",
                                       "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "KAFKA_SASL_USERNAME": "u",
                                       "KAFKA_SASL_PASSWORD": "s3cret-pw"})
    config = settings.client_config("c")
    assert config["sasl_plain_password"] == "s3cret-pw" and config["sasl_mechanism"] == "SCRAM-SHA-512"
    assert "s3cret-pw" not in repr(settings) and "s3cret-pw" not in settings.describe()
    with pytest.raises(UserError, match="KAFKA_SASL_USERNAME"):
        KafkaSettings.from_env({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"})


def test_tls_settings_are_passed_through_and_checked(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = KafkaSettings.from_env({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": str(ca)})
    assert settings.client_config("c")["ssl_cafile"] == str(ca)
    with pytest.raises(UserError, match="missing file"):
        KafkaSettings.from_env({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": str(tmp_path / "none.pem")})
