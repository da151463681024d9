"""Shared fixtures: a tiny encoder and artifact built here, and a real Kafka broker.

Kafka comes from KAFKA_BOOTSTRAP_SERVERS when set (make test starts the local KRaft broker
and sets it), else from testcontainers where a Docker engine runs (KAFKA_TEST_IMAGE, default
apache/kafka:4.1.1; make stack-test runs a stand-in built here). With neither, Kafka tests
fail under CI=true and skip otherwise.
"""

from __future__ import annotations

import io
import os
import random
import re
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from contract.kafka import CONNECT_TIMEOUT_MS, KafkaSettings
from worker import delivery

ROOT = Path(__file__).resolve().parents[1]
# A connect-time user error ends within the client's connect timeout plus start-up (imports and the model
# load, which come first so that artifact errors are found first; 10 s on a loaded CI machine): the bound
# proves it gives up rather than retrying forever, not how fast it is.
GIVES_UP_S = CONNECT_TIMEOUT_MS / 1000 + 30
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


@pytest.fixture(autouse=True)
def _real_delivery_clock():
    """tests/fakes.py's harness runs delivery on its own clock; every test starts on the real one."""
    delivery.clock = time.monotonic


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
    save_artifact(folder, fit.estimator, Manifest.of(encoder, data_sha256="0" * 64, metrics={}))
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


def _kafka_container(image: str):
    """A single-node KRaft broker from an image configured as apache/kafka is (KAFKA_* variables,
    /etc/kafka/docker/run), through testcontainers. testcontainers' KafkaContainer drives Confluent's
    images only; as testcontainers-java does for apache/kafka, the container waits for a start script
    that advertises the host port, known only once the container runs."""
    import re

    from testcontainers.core.container import DockerContainer
    from testcontainers.core.wait_strategies import LogMessageWaitStrategy

    script = "/tmp/tc-start.sh"
    container = DockerContainer(image).with_exposed_ports(9092).with_command(
        ["sh", "-c", f"while [ ! -f {script} ]; do sleep 0.1; done; exec sh {script}"])
    for name, value in {
        "KAFKA_NODE_ID": "1", "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": "PLAINTEXT://:9092,BROKER://:9093,CONTROLLER://:9094",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "PLAINTEXT:PLAINTEXT,BROKER:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "KAFKA_INTER_BROKER_LISTENER_NAME": "BROKER", "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9094", "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1", "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
    }.items():
        container.with_env(name, value)
    container.start()
    try:
        advertised = (f"PLAINTEXT://{container.get_container_host_ip()}:{container.get_exposed_port(9092)},"
                      "BROKER://localhost:9093")
        body = f"export KAFKA_ADVERTISED_LISTENERS={advertised}\nexec /etc/kafka/docker/run\n".encode()
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            info = tarfile.TarInfo(script.lstrip("/"))
            info.size, info.mode = len(body), 0o755
            tar.addfile(info, io.BytesIO(body))
        container.get_wrapped_container().put_archive("/", archive.getvalue())
        LogMessageWaitStrategy(re.compile(r"Kafka Server started")).with_startup_timeout(180).wait_until_ready(
            container)
    except BaseException:
        container.stop()
        raise
    return container


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """KAFKA_BOOTSTRAP_SERVERS, else a broker in Docker: KAFKA_TEST_IMAGE (default apache/kafka:4.1.1)."""
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if bootstrap and _reachable(bootstrap):
        yield bootstrap
        return
    if not bootstrap and _docker_engine():
        container = _kafka_container(os.environ.get("KAFKA_TEST_IMAGE", "apache/kafka:4.1.1"))
        address = f"{container.get_container_host_ip()}:{container.get_exposed_port(9092)}"
        os.environ["KAFKA_BOOTSTRAP_SERVERS"] = address
        try:
            yield address
        finally:
            container.stop()
        return
    message = (f"no Kafka broker: KAFKA_BOOTSTRAP_SERVERS={bootstrap!r} does not answer and no Docker engine; "
               "run the tests with `make test`, which starts the local broker")
    if os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def kafka_settings(kafka_bootstrap):
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
