"""`sentiment-worker --check`: will this worker run here? For deploy pipelines and init containers.

Loads the model, reaches Kafka with the given settings, checks that the three topics exist
and that the group can be joined, prints one line per finding and answers 0 (all good) or 1.
Nothing is consumed or committed: the check joins the group as a dynamic member (never with
the static instance id, which would fence a running replica), pauses whatever it is assigned
before any fetch, and leaves again; a running group sees one short rebalance, as when a
replica starts.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from typing import TextIO

from kafka import KafkaAdminClient, KafkaConsumer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError

from contract.cli import UserError
from contract.kafka import KafkaSettings, explain_connection_error
from models.classifier import Classifier
from worker.config import WorkerConfig

UNKNOWN_TOPIC = 3  # UNKNOWN_TOPIC_OR_PARTITION in a metadata answer


class _PauseOnAssign(ConsumerRebalanceListener):
    """Pauses every partition as it is assigned, so that polling joins the group but fetches nothing."""

    def __init__(self, consumer: KafkaConsumer) -> None:
        self.consumer, self.joined, self.assigned = consumer, False, 0

    def on_partitions_revoked(self, revoked) -> None:
        pass

    def on_partitions_assigned(self, assigned) -> None:
        self.consumer.pause(*assigned)
        self.joined, self.assigned = True, len(assigned)


class Report:
    """Findings as they come, one line each, on `out`, with any secret of the settings masked."""

    def __init__(self, out: TextIO, redact: Callable[[str], str]) -> None:
        self.out, self.redact, self.failures = out, redact, 0

    def step(self, what: str, action: Callable[[], str]) -> bool:
        """Run `action`; its answer is the finding, a UserError or Kafka error the failure."""
        try:
            found, ok = action(), True
        except UserError as err:
            found, ok = str(err), False
        except Exception as err:  # noqa: BLE001 - a check reports whatever stops the worker
            found, ok = f"{type(err).__name__}: {err}", False
        self.failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'}  {what}: {self.redact(found)}", file=self.out, flush=True)
        return ok


def check(config: WorkerConfig, settings: KafkaSettings, out: TextIO = sys.stdout,
          join_timeout_s: float = 30.0) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # an interrupted check must not read as a pass (exit 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    report = Report(out, settings.redact)

    def model() -> str:
        classifier = Classifier.load(config.model, config.device, config.dtype, config.quantize)  # as the worker
        encoder = classifier.encoder
        return (f"{classifier.model_id}, encoder {encoder.name} ({encoder.pooling} pooling) on {encoder.device} "
                f"({encoder.dtype_name})")

    report.step("model", model)
    found: dict[str, dict] = {}

    def broker() -> str:
        admin = None
        try:
            admin = KafkaAdminClient(**settings.client_config("sentiment-worker-check"))
            cluster = admin.describe_cluster()
            found.update((t["name"], t) for t in admin.describe_topics(
                [config.input_topic, config.output_topic, config.dlq_topic]))
        except KafkaError as err:
            raise explain_connection_error(settings, err) from None
        finally:
            if admin is not None:
                admin.close()
        return f"{settings.describe()}: {len(cluster['brokers'])} broker(s), cluster {cluster['cluster_id']}"

    if report.step("kafka", broker):
        for role, name in (("input", config.input_topic), ("output", config.output_topic),
                           ("dead-letter", config.dlq_topic)):
            report.step(f"{role} topic {name}", lambda name=name: _topic(found.get(name)))
        if found.get(config.input_topic, {}).get("error_code") == 0:
            report.step(f"group {config.group}", lambda: _join(config, settings, join_timeout_s))
    print("check passed" if not report.failures else f"check failed: {report.failures} problem(s)",
          file=out, flush=True)
    return 1 if report.failures else 0


def _topic(found: dict | None) -> str:
    if found is None or found["error_code"] == UNKNOWN_TOPIC:
        raise UserError("missing; create it first (the worker does not rely on topic auto-creation)")
    if found["error_code"]:
        raise UserError(f"the broker answered error code {found['error_code']} (not authorized to describe it?)")
    return f"{len(found['partitions'])} partition(s)"


def _join(config: WorkerConfig, settings: KafkaSettings, timeout_s: float) -> str:
    consumer = listener = None
    try:
        consumer = KafkaConsumer(**settings.client_config(f"sentiment-worker-{config.group}-check"),
                                 group_id=config.group, enable_auto_commit=False, auto_offset_reset="earliest")
        listener = _PauseOnAssign(consumer)
        consumer.partitions_for_topic(config.input_topic)  # metadata first, or the first assignment may be empty
        consumer.subscribe([config.input_topic], listener=listener)
        deadline = time.monotonic() + timeout_s
        while not listener.joined and time.monotonic() < deadline:
            consumer.poll(timeout_ms=200)
    except KafkaError as err:
        raise UserError(f"cannot join: {type(err).__name__}: {settings.redact(str(err))}") from None
    finally:
        if consumer is not None:
            consumer.close(autocommit=False)
    if not listener.joined:
        raise UserError(f"not joined within {timeout_s:.0f} s (coordinator unavailable or group not authorized?)")
    return f"joined ({listener.assigned} partition(s) assigned to the check, none fetched) and left again"
