"""Shared fixtures: a tiny encoder and artifact built here, and a real Kafka broker.

Kafka comes from KAFKA_BOOTSTRAP_SERVERS when set (make test starts the local KRaft broker
and sets it), else from testcontainers where a Docker engine runs. With neither, Kafka tests
fail under CI=true and skip otherwise.
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
POSITIVE = ["a wonderful , moving film", "great acting and a smart script", "funny , warm and delightful",
            "the best movie of the year", "beautiful and touching", "a stirring , brilliant story"]
NEGATIVE = ["a dull , boring mess", "terrible acting and a lazy script", "painfully slow and stupid",
            "the worst movie of the year", "ugly and tedious", "a flat , lifeless bore"]


def labeled_sentences(n: int = 120, seed: int = 0) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = rng.sample(POSITIVE if label else NEGATIVE, 2)
        texts.append(f"{words[0]} ; {words[1]}")
        labels.append(label)
    return texts, labels


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    from models.build import save_random_distilbert

    texts, _ = labeled_sentences()
    return save_random_distilbert(tmp_path_factory.mktemp("tiny-encoder"), texts * 3, tiny=True, max_length=128)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_encoder_dir, tmp_path_factory) -> Path:
    """A real artifact: tiny encoder features of labeled sentences, logistic head fitted on them."""
    from models.artifact import Manifest, save_artifact
    from models.encoder import Encoder
    from models.head import fit_head

    encoder = Encoder.load(str(tiny_encoder_dir), device="cpu", dtype="fp32")
    texts, labels = labeled_sentences()
    fit = fit_head(encoder.embed(texts), np.asarray(labels), grid=(1.0,))
    folder = tmp_path_factory.mktemp("artifacts") / "tiny"
    save_artifact(folder, fit.estimator, Manifest(
        encoder=str(tiny_encoder_dir), encoder_source="local", encoder_revision=None,
        hidden_size=encoder.hidden_size, dtype="fp32", data_sha256="0" * 64, metrics={}))
    return folder


# -- Kafka ---------------------------------------------------------------------------------------


def _reachable(bootstrap: str) -> bool:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        socket.create_connection((host or "localhost", int(port)), timeout=3).close()
        return True
    except OSError:
        return False


def _docker_engine() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if bootstrap and _reachable(bootstrap):
        yield bootstrap
        return
    if not bootstrap and _docker_engine():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("apache/kafka:4.1.1").with_kraft() as container:
            address = container.get_bootstrap_server()
            os.environ["KAFKA_BOOTSTRAP_SERVERS"] = address
            yield address
        return
    message = (f"no Kafka broker: KAFKA_BOOTSTRAP_SERVERS={bootstrap!r} does not answer and no Docker engine; "
               "run the tests with `make test`, which starts the local broker")
    if os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def kafka_settings(kafka_bootstrap):
    from contract.kafka import KafkaSettings

    return KafkaSettings(bootstrap_servers=kafka_bootstrap)


@pytest.fixture
def topics(kafka_settings, request):
    """Unique input/output/dead-letter topic names (and group) for one test; deleted afterwards."""
    from ops.harness import Topics

    test = re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:30]  # a parameter's brackets are no topic name
    names = Topics.prefixed(kafka_settings, f"t{uuid.uuid4().hex[:8]}-{test}")
    yield names
    names.delete()


# Tests that run the worker with each Kafka client take `kafka_client` as a parameter (the `env` fixture
# passes it on as SENTIMENT_KAFKA_CLIENT); CLIENTS_LONG sends the confluent run to `make test-long`.
CLIENTS = ["kafka-python", "confluent"]
CLIENTS_LONG = ["kafka-python", pytest.param("confluent", marks=pytest.mark.long)]


@pytest.fixture
def kafka_client() -> str:
    """The worker's --kafka-client where a test does not parametrize it: the default."""
    return "kafka-python"


@pytest.fixture
def env(kafka_bootstrap, kafka_client) -> dict[str, str]:
    """Environment for child processes (producer, worker) run against the test broker."""
    if kafka_client == "confluent":
        pytest.importorskip("confluent_kafka", reason="the `fast` extra (confluent-kafka) is not installed")
    child = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, PYTHONUNBUFFERED="1",
                 SENTIMENT_KAFKA_CLIENT=kafka_client)
    child["PYTHONPATH"] = str(ROOT) + os.pathsep + child.get("PYTHONPATH", "")
    child.pop("SENTIMENT_MODEL", None)
    return child


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def sst2_dir() -> Path:
    """SST-2 (train.tsv, dev.tsv): SST2_DIR (make test points it at ../shared/data/sst2 when present)."""
    folder = os.environ.get("SST2_DIR")
    if not folder or not (Path(folder) / "dev.tsv").is_file():
        pytest.skip("SST-2 not available: set SST2_DIR to a folder holding train.tsv and dev.tsv")
    return Path(folder)


def sasl_env(env: dict[str, str], password: str) -> dict[str, str]:
    """`env` pointed at the local broker's SASL/SCRAM listener as user `sentiment` with `password`."""
    bootstrap = os.environ.get("KAFKA_SASL_BOOTSTRAP")
    if not bootstrap:
        pytest.skip("the SASL/SCRAM listener comes with the local broker (make test)")
    return dict(env, KAFKA_BOOTSTRAP_SERVERS=bootstrap, KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
                KAFKA_SASL_MECHANISM="SCRAM-SHA-512", KAFKA_SASL_USERNAME="sentiment", KAFKA_SASL_PASSWORD=password)
