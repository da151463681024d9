"""`python -m worker`: wire config, model, Kafka clients and metrics together, then run."""

from __future__ import annotations

import logging
import os
import signal
import sys


def _stop_while_starting(signum: int, _frame: object) -> None:
    """Until the loop runs nothing is consumed: a SIGTERM/SIGINT while the libraries import or the model loads
    ends at once, cleanly (installed before the heavy imports, which take a while on a busy machine)."""
    logging.getLogger("worker").info("stopped while starting (signal %d)", signum)
    logging.shutdown()
    os._exit(0)  # no client thread may hold the exit up


def _on_signals_while_starting() -> None:
    signal.signal(signal.SIGTERM, _stop_while_starting)
    signal.signal(signal.SIGINT, _stop_while_starting)


if __name__ == "__main__":  # `python -m worker`: before the imports below; never in a process importing this
    _on_signals_while_starting()

from collections.abc import Callable, Sequence

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

from contract.cli import UserError, run
from contract.kafka import KafkaSettings, explain_connection_error
from contract.logs import setup_logging
from models.artifact import load_artifact
from models.classifier import Classifier
from worker.check import check
from worker.clients import ConsumerClient, ProducerClient
from worker.config import WorkerConfig, parse_args
from worker.delivery import AtLeastOnce, ExactlyOnce, Interrupted
from worker.inference import DeviceBroken, InferenceStage
from worker.kafka_python import KafkaPythonConsumer, KafkaPythonProducer, TopicLimits, producer_throughput
from worker.metrics import Health, LagMonitor, WorkerMetrics, serve
from worker.service import GIL_SWITCH_S, Worker

log = logging.getLogger("worker")
TOPIC_WAIT_MS = 15_000
SEND_BLOCK_MS = 1_000  # a send waits this long for a missing topic's metadata, then it is retried later
TRANSACTION_TIMEOUT_MS = 10_000
REQUEST_TIMEOUT_MS = 10_000  # a produce request to a broker that went away fails this soon
DELIVERY_TIMEOUT_MS = 20_000  # the client gives up on a send, and the worker sends it again with a fresh
#                               producer (kafka-python's can stay stuck); UNANSWERED_LIMIT_S lies beyond it


def connect(config: WorkerConfig, settings: KafkaSettings,
            limits: TopicLimits) -> tuple[KafkaPythonConsumer, Callable[[], KafkaProducer]]:
    """The consumer and a producer factory; an unreachable broker, bad credentials or a missing topic
    end here in one line."""
    base = settings.client_config(f"sentiment-worker-{config.group}")
    exactly_once = config.guarantee == "exactly-once"

    def make_producer(block_ms: int = SEND_BLOCK_MS) -> KafkaProducer:
        return KafkaProducer(
            **{**base, "request_timeout_ms": REQUEST_TIMEOUT_MS},
            **producer_throughput([limits.get(t) for t in (config.output_topic, config.dlq_topic)]),
            enable_idempotence=True, max_block_ms=block_ms, delivery_timeout_ms=DELIVERY_TIMEOUT_MS,
            max_request_size=max(1 << 20, 2 * config.max_record_bytes),
            **({"transactional_id": config.transactional_id, "transaction_timeout_ms": TRANSACTION_TIMEOUT_MS}
               if exactly_once else {}))

    try:
        probe = make_producer(TOPIC_WAIT_MS)
        try:
            for topic in (config.input_topic, config.output_topic, config.dlq_topic):
                probe.partitions_for(topic)  # the broker creates it here when auto-creation is on
        except KafkaTimeoutError:
            raise UserError(f"topic {topic!r} does not exist and the broker does not create topics; "
                            "create it first") from None
        finally:
            probe.close(timeout=0)
        consumer = KafkaPythonConsumer.connect(
            settings, base["client_id"], config.group, config.max_wait_ms, config.max_batch_size * 4,
            config.max_record_bytes, config.session_timeout_ms,
            config.instance_id if config.static_membership else None)
    except KafkaError as err:
        raise explain_connection_error(settings, err) from None
    return consumer, make_producer


def connect_client(config: WorkerConfig, settings: KafkaSettings, limits: TopicLimits
                   ) -> tuple[ConsumerClient, Callable[[], ProducerClient], tuple[type[Exception], ...]]:
    """The --kafka-client's consumer, producer factory and exception types."""
    log.info("Kafka client: %s", config.kafka_client)
    if config.kafka_client == "confluent":
        try:
            from confluent_kafka import KafkaException

            from worker import confluent
        except ImportError:
            raise UserError("--kafka-client confluent needs confluent-kafka: pip install '.[fast]'") from None
        consumer, make = confluent.connect(config, settings, limits.get)
        return consumer, make, (KafkaError, KafkaException)
    consumer, make_producer = connect(config, settings, limits)
    exactly_once = config.guarantee == "exactly-once"
    return consumer, lambda: KafkaPythonProducer(make_producer(), exactly_once), (KafkaError,)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    setup_logging(config.log_level, config.log_format, config.instance)
    settings = KafkaSettings.from_env(client=config.kafka_client)
    if config.check:
        return check(config, settings)
    artifact = load_artifact(config.model)
    sys.setswitchinterval(GIL_SWITCH_S)
    metrics, health = WorkerMetrics(), Health()
    if config.metrics_port:
        try:
            serve(metrics, health, config.metrics_host, config.metrics_port)
        except OSError as err:
            raise UserError(f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}: {err}") from None
    classifier = Classifier.load(artifact, config.device, config.dtype, config.quantize)  # pinned, pooled as recorded
    encoder = classifier.encoder
    if config.graph == "torchscript":
        encoder.trace()
    config = config.with_batch_caps(classifier.max_rows, classifier.max_tokens, classifier.batch_overhead_tokens)
    if config.max_batch_tokens < encoder.max_length:
        raise UserError(f"--max-batch-tokens {config.max_batch_tokens} is below the model's limit of "
                        f"{encoder.max_length} tokens per review")
    metrics.info.labels(artifact.model_id, str(encoder.device), encoder.dtype_name, config.guarantee).set(1)
    health.model_loaded = True
    log.info("model %s: encoder %s on %s (%s, %s), guarantee %s, Kafka %s", artifact.model_id, encoder.name,
             encoder.device, encoder.dtype_name, encoder.graph, config.guarantee, settings.describe())
    try:
        limits = TopicLimits(settings, [config.output_topic, config.dlq_topic])
    except KafkaError as err:
        raise explain_connection_error(settings, err) from None
    consumer, new_producer, client_errors = connect_client(config, settings, limits)
    lag = LagMonitor(settings, config.group, metrics, health)
    lag.start()
    inference = InferenceStage(classifier.score_ids, encoder.probe_ids(), config.max_device_failures)
    exactly_once = config.guarantee == "exactly-once"

    def make_delivery(tracker, on_delivered):
        parts = (new_producer, consumer, tracker, config.dlq_topic, on_delivered, metrics.publish_errors.inc)
        pacing = {"commit_interval_s": config.commit_interval_ms / 1000, "max_message_bytes": limits.get}
        if exactly_once:
            return ExactlyOnce(*parts, **pacing, transaction_timeout_s=TRANSACTION_TIMEOUT_MS / 1000,
                               instance=config.transactional_id)
        return AtLeastOnce(*parts, **pacing)

    try:
        Worker(config, encoder.tokenize, artifact.model_id, inference, metrics, health, consumer, make_delivery).run()
    except Interrupted:
        log.warning("second signal: stopped without finishing; nothing unacknowledged was committed")
        return 1
    except DeviceBroken as err:
        log.error("the device is broken, exiting with nothing committed past the failed batches: %s", err)
        return 3
    except client_errors as err:
        raise explain_connection_error(settings, err) from None
    finally:
        lag.stop()
        limits.stop()
    log.info("stopped cleanly")
    return 0


def cli() -> None:
    """The `sentiment-worker` console script."""
    _on_signals_while_starting()
    run(main)


if __name__ == "__main__":
    cli()
