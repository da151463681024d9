"""Every flag can come from SENTIMENT_<FLAG>; bad values are refused clearly."""

import pytest

from contract.cli import UserError
from contract.kafka import KafkaSettings
from worker.config import parse_args


def test_env_sets_flags_and_flags_win(monkeypatch):
    monkeypatch.setenv("SENTIMENT_MODEL", "models/artifacts/x")
    monkeypatch.setenv("SENTIMENT_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("SENTIMENT_GUARANTEE", "exactly-once")
    config = parse_args(["--max-wait-ms", "5"])
    assert (config.model, config.max_batch_size, config.guarantee, config.max_wait_ms) == (
        "models/artifacts/x", 16, "exactly-once", 5)
    assert parse_args(["--max-batch-size", "8"]).max_batch_size == 8


def test_bad_env_choice_exits_with_a_message(monkeypatch, capsys):
    monkeypatch.setenv("SENTIMENT_GUARANTEE", "maybe-once")
    with pytest.raises(SystemExit):
        parse_args(["--model", "m"])
    assert "SENTIMENT_GUARANTEE" in capsys.readouterr().err


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
