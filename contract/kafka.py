"""The one place that turns environment settings into Kafka client configuration.

Producer, worker, tests and tools all build their clients from `KafkaSettings`, so that
security settings (SASL, TLS) behave the same everywhere and passwords never reach logs.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

from contract.cli import UserError

DEFAULT_BOOTSTRAP = "localhost:9092"
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
CONNECT_TIMEOUT_MS = 20_000


@dataclass(frozen=True)
class KafkaSettings:
    """Connection and security settings, read from the usual KAFKA_* variables."""

    bootstrap_servers: str = DEFAULT_BOOTSTRAP
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> KafkaSettings:
        env = os.environ if env is None else env
        settings = cls(
            bootstrap_servers=env.get("KAFKA_BOOTSTRAP_SERVERS") or DEFAULT_BOOTSTRAP,
            security_protocol=(env.get("KAFKA_SECURITY_PROTOCOL") or "PLAINTEXT").upper(),
            sasl_mechanism=(env.get("KAFKA_SASL_MECHANISM") or "").upper() or None,
            sasl_username=env.get("KAFKA_SASL_USERNAME") or None,
            sasl_password=env.get("KAFKA_SASL_PASSWORD") or None,
            ssl_cafile=env.get("KAFKA_SSL_CAFILE") or None,
            ssl_certfile=env.get("KAFKA_SSL_CERTFILE") or None,
            ssl_keyfile=env.get("KAFKA_SSL_KEYFILE") or None,
        )
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
                raise UserError(f"{self.security_protocol} needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise UserError(f"KAFKA_{name.upper()} points to a missing file: {path}")

    def client_config(self, client_id: str) -> dict[str, Any]:
        """Keyword arguments shared by KafkaProducer, KafkaConsumer and KafkaAdminClient."""
        config: dict[str, Any] = {
            "bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()],
            "client_id": client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": 30_000,
            "bootstrap_timeout_ms": CONNECT_TIMEOUT_MS,
            "reconnect_backoff_max_ms": 2_000,
        }
        if self.security_protocol.startswith("SASL"):
            config.update(
                sasl_mechanism=self.sasl_mechanism or "PLAIN",
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        if self.security_protocol.endswith("SSL"):
            config.update(ssl_cafile=self.ssl_cafile, ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile)
        return config

    def describe(self) -> str:
        """A loggable summary: never includes the password."""
        user = f" as {self.sasl_username}" if self.sasl_username else ""
        return f"{self.bootstrap_servers} ({self.security_protocol}{user})"


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
    """Turn a client exception at connect time into the one line a user sees (never with the password)."""
    name = type(err).__name__
    text = str(err)
    if settings.sasl_password:
        text = text.replace(settings.sasl_password, "***")
    if "Authentication" in name or "authentication" in text.lower():
        return UserError(f"Kafka at {settings.describe()} rejected the credentials ({name})")
    if name in ("NoBrokersAvailable", "KafkaTimeoutError", "KafkaConnectionError"):
        if settings.security_protocol != "PLAINTEXT" and _tcp_answers(settings.bootstrap_servers):
            return UserError(f"Kafka at {settings.describe()} answers but refused the session: check the "
                             "credentials (KAFKA_SASL_USERNAME/PASSWORD) and the TLS/SASL settings")
        return UserError(f"cannot reach Kafka at {settings.describe()} ({name}); is the broker up?")
    return UserError(f"Kafka at {settings.describe()}: {name}: {text}")
