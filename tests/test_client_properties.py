"""KAFKA_CONFIG_FILE: a client.properties file, its kafka-python subset, KAFKA_* overrides, secrets kept."""

import re

import pytest

from contract.cli import UserError
from contract.kafka import PROPERTIES, KafkaSettings, read_properties
from tests.conftest import ROOT

JAAS = ('org.apache.kafka.common.security.scram.ScramLoginModule required username="svc" '
        'password="pa ss=w0rd";')


def write(tmp_path, text):
    path = tmp_path / "client.properties"
    path.write_text(text)
    return str(path)


def test_java_properties_syntax(tmp_path):
    path = write(tmp_path, "# a comment\n! another\n\n  bootstrap.servers = b1:9092,\\\n     b2:9092\n"
                           "client.id: billing\nsasl.username svc\nssl.endpoint.identification.algorithm=\n"
                           "key\\=with\\:escapes=tab\\there\\u0021\n")
    assert read_properties(path) == {"bootstrap.servers": "b1:9092,b2:9092", "client.id": "billing",
                                     "sasl.username": "svc", "ssl.endpoint.identification.algorithm": "",
                                     "key=with:escapes": "tab\there!"}


def test_the_file_sets_the_settings_and_kafka_variables_win(tmp_path):
    path = write(tmp_path, f"bootstrap.servers=file:9094\nsecurity.protocol=SASL_PLAINTEXT\n"
                           f"sasl.mechanism=SCRAM-SHA-512\nsasl.jaas.config={JAAS}\nclient.id=billing\n"
                           "request.timeout.ms=40000\n")
    settings = KafkaSettings.from_env({"KAFKA_CONFIG_FILE": path})
    config = settings.client_config("role")
    assert config["bootstrap_servers"] == ["file:9094"] and config["client_id"] == "billing"
    assert (config["sasl_mechanism"], config["sasl_plain_username"], config["sasl_plain_password"]) == (
        "SCRAM-SHA-512", "svc", 'pa ss=w0rd')
    assert config["request_timeout_ms"] == 40000
    overridden = KafkaSettings.from_env({"KAFKA_CONFIG_FILE": path, "KAFKA_BOOTSTRAP_SERVERS": "env:1",
                                         "KAFKA_SASL_PASSWORD": "from-env"})
    assert overridden.client_config("r")["bootstrap_servers"] == ["env:1"]
    assert overridden.client_config("r")["sasl_plain_password"] == "from-env"
    assert overridden.sasl_username == "svc"


def test_file_passwords_never_show(tmp_path):
    path = write(tmp_path, f"security.protocol=SASL_SSL\nsasl.jaas.config={JAAS}\nssl.key.password=key-secret\n")
    settings = KafkaSettings.from_env({"KAFKA_CONFIG_FILE": path})
    shown = repr(settings) + settings.describe()
    assert "w0rd" not in shown and "key-secret" not in shown and path in settings.describe()
    assert settings.redact('failed for pa ss=w0rd and key-secret') == "failed for *** and ***"
    broken = write(tmp_path, 'sasl.jaas.config=org.example.Custom required password="hunter2-x";\n')
    with pytest.raises(UserError) as caught:
        KafkaSettings.from_env({"KAFKA_CONFIG_FILE": broken})
    assert "hunter2-x" not in str(caught.value) and "sasl.jaas.config" in str(caught.value)


def test_a_key_kafka_python_cannot_honour_is_one_line_naming_it(tmp_path):
    path = write(tmp_path, "bootstrap.servers=b:9092\nenable.idempotence=true\n")
    with pytest.raises(UserError) as caught:
        KafkaSettings.from_env({"KAFKA_CONFIG_FILE": path})
    message = str(caught.value)
    assert "'enable.idempotence'" in message and "kafka-python" in message and "\n" not in message
    assert "true" not in message.split("supported:")[0]
    java = write(tmp_path, "ssl.truststore.location=/etc/kafka/trust.jks\n")
    with pytest.raises(UserError, match="use ssl.ca.location"):
        KafkaSettings.from_env({"KAFKA_CONFIG_FILE": java})
    with pytest.raises(UserError, match="cannot read"):
        KafkaSettings.from_env({"KAFKA_CONFIG_FILE": str(tmp_path / "none.properties")})


def test_the_confluent_client_gets_the_file_as_it_is(tmp_path):
    path = write(tmp_path, f"bootstrap.servers=file:9094\nsecurity.protocol=SASL_SSL\nsasl.mechanism=PLAIN\n"
                           f"sasl.jaas.config={JAAS}\nenable.idempotence=true\nssl.endpoint.identification.algorithm=\n"
                           "queue.buffering.max.ms=5\n")
    settings = KafkaSettings.from_env({"KAFKA_CONFIG_FILE": path, "KAFKA_BOOTSTRAP_SERVERS": "env:1"},
                                      client="confluent")
    assert settings.librdkafka_config("role") == {
        "bootstrap.servers": "env:1", "security.protocol": "SASL_SSL", "sasl.mechanisms": "PLAIN",
        "sasl.username": "svc", "sasl.password": 'pa ss=w0rd', "enable.idempotence": "true",
        "queue.buffering.max.ms": "5", "ssl.endpoint.identification.algorithm": "none", "client.id": "role",
        "socket.connection.setup.timeout.ms": "20000", "reconnect.backoff.max.ms": "2000"}
    assert settings.ssl_check_hostname is False


def test_the_readme_documents_exactly_the_subset():
    readme = (ROOT / "README.md").read_text()
    section = re.split(r"\n##+ ", readme.split("### The client.properties subset", 1)[1], maxsplit=1)[0]
    documented = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
    assert documented == set(PROPERTIES)
