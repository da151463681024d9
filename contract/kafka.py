"""The one place that turns Kafka settings into client configuration.

Producer, worker, tests and tools all build their clients from `KafkaSettings`, so that
security settings (SASL, TLS) behave the same everywhere and passwords never reach logs.
Settings come from a `client.properties` file named by `KAFKA_CONFIG_FILE` (what Kafka users
already have), overridden by the `KAFKA_*` variables. The confluent client (librdkafka) takes
the file as it is; kafka-python takes the subset in `PROPERTIES` and refuses any other key.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.cli import UserError

DEFAULT_BOOTSTRAP = "localhost:9092"
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
CONNECT_TIMEOUT_MS = 20_000
KAFKA_CLIENTS = ("kafka-python", "confluent")

# client.properties keys kafka-python can honour: key -> KafkaSettings field (librdkafka and Java names).
PROPERTIES: dict[str, str] = {
    "bootstrap.servers": "bootstrap_servers",
    "client.id": "client_id",
    "security.protocol": "security_protocol",
    "sasl.mechanism": "sasl_mechanism",
    "sasl.mechanisms": "sasl_mechanism",
    "sasl.username": "sasl_username",
    "sasl.password": "sasl_password",
    "sasl.jaas.config": "sasl_username",  # and sasl_password: PlainLoginModule / ScramLoginModule only
    "ssl.ca.location": "ssl_cafile",
    "ssl.certificate.location": "ssl_certfile",
    "ssl.key.location": "ssl_keyfile",
    "ssl.key.password": "ssl_key_password",
    "ssl.crl.location": "ssl_crlfile",
    "ssl.endpoint.identification.algorithm": "ssl_check_hostname",  # https (default) | none or empty
    "request.timeout.ms": "request_timeout_ms",
    "reconnect.backoff.ms": "reconnect_backoff_ms",
    "reconnect.backoff.max.ms": "reconnect_backoff_max_ms",
    "retry.backoff.ms": "retry_backoff_ms",
    "connections.max.idle.ms": "connections_max_idle_ms",
}
# Java-only keys whose meaning kafka-python has under another name.
HINTS = {
    "ssl.truststore.location": "use ssl.ca.location with a PEM file",
    "ssl.keystore.location": "use ssl.certificate.location and ssl.key.location with PEM files",
}
# The KAFKA_* variables, each overriding its field (and the file).
ENVIRONMENT = {
    "KAFKA_BOOTSTRAP_SERVERS": "bootstrap_servers",
    "KAFKA_SECURITY_PROTOCOL": "security_protocol",
    "KAFKA_SASL_MECHANISM": "sasl_mechanism",
    "KAFKA_SASL_USERNAME": "sasl_username",
    "KAFKA_SASL_PASSWORD": "sasl_password",
    "KAFKA_SSL_CAFILE": "ssl_cafile",
    "KAFKA_SSL_CERTFILE": "ssl_certfile",
    "KAFKA_SSL_KEYFILE": "ssl_keyfile",
}
# KafkaSettings field -> librdkafka key, for what the variables may have overridden.
LIBRDKAFKA = {
    "bootstrap_servers": "bootstrap.servers",
    "client_id": "client.id",
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanisms",
    "sasl_username": "sasl.username",
    "sasl_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_key_password": "ssl.key.password",
    "ssl_crlfile": "ssl.crl.location",
}
_JAAS = re.compile(r"""^\s*org\.apache\.kafka\.common\.security\.(?:plain\.PlainLoginModule|scram\.ScramLoginModule)
                       \s+required\s+(?P<args>.*?);?\s*$""", re.X | re.S)
_JAAS_ARG = re.compile(r"""(\w+)\s*=\s*"((?:[^"\\]|\\.)*)"|(\w+)\s*=\s*(\S+)""")


@dataclass(frozen=True)
class KafkaSettings:
    """Connection and security settings: a client.properties file, overridden by the KAFKA_* variables."""

    bootstrap_servers: str = DEFAULT_BOOTSTRAP
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_key_password: str | None = field(default=None, repr=False)
    ssl_crlfile: str | None = None
    ssl_check_hostname: bool = True
    client_id: str | None = None
    request_timeout_ms: int = 30_000
    reconnect_backoff_ms: int | None = None
    reconnect_backoff_max_ms: int = 2_000
    retry_backoff_ms: int | None = None
    connections_max_idle_ms: int | None = None
    properties: Mapping[str, str] = field(default_factory=dict, repr=False)  # the file as read (has secrets)
    config_file: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, client: str = "kafka-python") -> KafkaSettings:
        """Settings from KAFKA_CONFIG_FILE (when set) and the KAFKA_* variables, checked for `client`."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = env.get("KAFKA_CONFIG_FILE") or None
        properties: dict[str, str] = {}
        if path:
            properties = read_properties(path)
            values = _from_properties(properties, path, strict=client == "kafka-python")
        for name, attr in ENVIRONMENT.items():
            if env.get(name):
                values[attr] = env[name]
        for attr in ("security_protocol", "sasl_mechanism"):
            if values.get(attr):
                values[attr] = values[attr].upper()
        settings = cls(**values, properties=properties, config_file=path)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise UserError(
                f"KAFKA_SECURITY_PROTOCOL={self.security_protocol!r} is not one of {', '.join(SECURITY_PROTOCOLS)}"
            )
        if self.security_protocol.startswith("SASL"):
            mechanism = self.sasl_mechanism or "PLAIN"
            if mechanism not in SASL_MECHANISMS:
                raise UserError(f"KAFKA_SASL_MECHANISM={mechanism!r} is not one of {', '.join(SASL_MECHANISMS)}")
            if not self.sasl_username or not self.sasl_password:
                raise UserError(f"{self.security_protocol} needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD "
                                "(or sasl.username/sasl.password or sasl.jaas.config in KAFKA_CONFIG_FILE)")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_crlfile"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise UserError(f"KAFKA_{name.upper()} points to a missing file: {path}")

    def client_config(self, client_id: str) -> dict[str, Any]:
        """Keyword arguments shared by kafka-python's KafkaProducer, KafkaConsumer and KafkaAdminClient."""
        config: dict[str, Any] = {
            "bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()],
            "client_id": self.client_id or client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
            "bootstrap_timeout_ms": CONNECT_TIMEOUT_MS,
            "reconnect_backoff_max_ms": self.reconnect_backoff_max_ms,
        }
        for name in ("reconnect_backoff_ms", "retry_backoff_ms", "connections_max_idle_ms"):
            if getattr(self, name) is not None:
                config[name] = getattr(self, name)
        if self.security_protocol.startswith("SASL"):
            config.update(
                sasl_mechanism=self.sasl_mechanism or "PLAIN",
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        if self.security_protocol.endswith("SSL"):
            config.update(ssl_cafile=self.ssl_cafile, ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile,
                          ssl_password=self.ssl_key_password, ssl_crlfile=self.ssl_crlfile,
                          ssl_check_hostname=self.ssl_check_hostname)
        return config

    def librdkafka_config(self, client_id: str) -> dict[str, str]:
        """Configuration for the confluent client: the properties file as it is (sasl.jaas.config turned into
        sasl.username/sasl.password, which librdkafka reads instead), with the KAFKA_* variables applied."""
        config = {"socket.connection.setup.timeout.ms": str(CONNECT_TIMEOUT_MS),
                  "reconnect.backoff.max.ms": str(self.reconnect_backoff_max_ms)}
        config.update((k, v) for k, v in self.properties.items() if k not in ("sasl.jaas.config", "sasl.mechanism"))
        config["client.id"] = client_id
        for attr, key in LIBRDKAFKA.items():
            value = getattr(self, attr)
            if value is not None:
                config[key] = value
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            config["sasl.mechanisms"] = "PLAIN"
        if not self.ssl_check_hostname:
            config["ssl.endpoint.identification.algorithm"] = "none"
        return config

    def describe(self) -> str:
        """A loggable summary: never includes a password."""
        user = f" as {self.sasl_username}" if self.sasl_username else ""
        source = f", settings from {self.config_file}" if self.config_file else ""
        return f"{self.bootstrap_servers} ({self.security_protocol}{user}{source})"

    def redact(self, text: str) -> str:
        """`text` with every secret of these settings replaced by ***."""
        for secret in (self.sasl_password, self.ssl_key_password):
            if secret:
                text = text.replace(secret, "***")
        return text


def read_properties(path: str) -> dict[str, str]:
    """A Java .properties file: `key=value`, `key: value` or `key value`, `#`/`!` comments, `\\` continuations.
    Errors name the file and line, never a value (values may be passwords)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"KAFKA_CONFIG_FILE={path}: cannot read it ({type(err).__name__})") from None
    result: dict[str, str] = {}
    logical = ""
    for line in text.splitlines():
        stripped = line.lstrip()
        if not logical and (not stripped or stripped[0] in "#!"):
            continue
        trailing = len(stripped) - len(stripped.rstrip("\\"))
        if trailing % 2:  # an odd number of backslashes continues the line
            logical += stripped[:-1]
            continue
        logical += stripped
        key, value = _split_property(logical)
        result[key] = value
        logical = ""
    if logical:
        key, value = _split_property(logical)
        result[key] = value
    return result


def _split_property(line: str) -> tuple[str, str]:
    i, key = 0, []
    while i < len(line) and line[i] not in "=: \t\f":
        if line[i] == "\\" and i + 1 < len(line):
            i += 1
        key.append(line[i])
        i += 1
    rest = line[i:].lstrip(" \t\f")
    if rest[:1] in ("=", ":"):
        rest = rest[1:].lstrip(" \t\f")
    return _unescape("".join(key)), _unescape(rest)


def _unescape(text: str) -> str:
    simple = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}
    return re.sub(r"\\(u[0-9a-fA-F]{4}|.)",
                  lambda m: chr(int(m[1][1:], 16)) if len(m[1]) == 5 else simple.get(m[1], m[1]), text)


def _from_properties(properties: Mapping[str, str], path: str, strict: bool) -> dict[str, Any]:
    """KafkaSettings fields from the file's keys; with `strict` (kafka-python) any other key is an error."""
    values: dict[str, Any] = {}
    for key, value in properties.items():
        attr = PROPERTIES.get(key)
        if attr is None:
            if strict:
                hint = f"; {HINTS[key]}" if key in HINTS else ""
                raise UserError(f"KAFKA_CONFIG_FILE={path}: key {key!r} is not supported by --kafka-client "
                                f"kafka-python{hint} (supported: {', '.join(sorted(set(PROPERTIES)))})")
            continue
        if key == "sasl.jaas.config":
            values["sasl_username"], values["sasl_password"] = _jaas_credentials(value, path)
        elif attr == "ssl_check_hostname":
            values[attr] = value.strip().lower() not in ("", "none")
        elif attr.endswith("_ms"):
            try:
                values[attr] = int(value)
            except ValueError:
                raise UserError(f"KAFKA_CONFIG_FILE={path}: {key} must be an integer (milliseconds)") from None
        else:
            values[attr] = value.strip() or None
    return values


def _jaas_credentials(value: str, path: str) -> tuple[str, str]:
    """Username and password of a PlainLoginModule/ScramLoginModule `sasl.jaas.config` (never echoed)."""
    match = _JAAS.match(value)
    args = {m[1] or m[3]: (m[2] if m[1] else m[4]) for m in _JAAS_ARG.finditer(match["args"])} if match else {}
    if "username" not in args or "password" not in args:
        raise UserError(f"KAFKA_CONFIG_FILE={path}: sasl.jaas.config must be a PlainLoginModule or "
                        'ScramLoginModule line with username="..." password="..."')
    return (re.sub(r"\\(.)", r"\1", args["username"]), re.sub(r"\\(.)", r"\1", args["password"]))


def _tcp_answers(bootstrap: str) -> bool:
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            socket.create_connection((host or "localhost", int(port)), timeout=3).close()
            return True
        except (OSError, ValueError):
            continue
    return False


def explain_connection_error(settings: KafkaSettings, err: Exception) -> UserError:
    """Turn a client exception at connect time into the one line a user sees (never with a password)."""
    name = type(err).__name__
    text = settings.redact(str(err))
    if "Authentication" in name or "authentication" in text.lower():
        return UserError(f"Kafka at {settings.describe()} rejected the credentials ({name})")
    if name in ("NoBrokersAvailable", "KafkaTimeoutError", "KafkaConnectionError"):
        if settings.security_protocol != "PLAINTEXT" and _tcp_answers(settings.bootstrap_servers):
            return UserError(f"Kafka at {settings.describe()} answers but refused the session: check the "
                             "credentials (KAFKA_SASL_USERNAME/PASSWORD) and the TLS/SASL settings")
        return UserError(f"cannot reach Kafka at {settings.describe()} ({name}); is the broker up?")
    return UserError(f"Kafka at {settings.describe()}: {name}: {text}")
