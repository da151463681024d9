"""`python -m worker`: wire config, model, Kafka clients and metrics together, then run."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

from contract.cli import UserError, run
from contract.kafka import KafkaSettings, explain_connection_error
from models.artifact import check_encoder, load_artifact
from models.encoder import Encoder
from models.head import TorchHead
from worker.check import check
from worker.config import WorkerConfig, parse_args
from worker.inference import InferenceStage
from worker.logs import setup_logging
from worker.metrics import Health, LagMonitor, WorkerMetrics, serve
from worker.service import Worker

log = logging.getLogger("worker")
TOPIC_WAIT_MS = 15_000


def connect(config: WorkerConfig, settings: KafkaSettings) -> tuple[KafkaConsumer, Callable[[], KafkaProducer]]:
    """The consumer and a producer factory; an unreachable broker, bad credentials or a missing topic
    end here in one line."""
    base = settings.client_config(f"sentiment-worker-{config.group}")
    exactly_once = config.guarantee == "exactly-once"

    def make_producer() -> KafkaProducer:
        return KafkaProducer(
            **base, acks="all", enable_idempotence=True, linger_ms=2, max_block_ms=TOPIC_WAIT_MS,
            max_request_size=max(1 << 20, 2 * config.max_record_bytes),
            **({"transactional_id": config.transactional_id, "transaction_timeout_ms": 10_000}
               if exactly_once else {}))

    try:
        probe = make_producer()
        try:
            for topic in (config.input_topic, config.output_topic, config.dlq_topic):
                probe.partitions_for(topic)  # the broker creates it here when auto-creation is on
        except KafkaTimeoutError:
            raise UserError(f"topic {topic!r} does not exist and the broker does not create topics; "
                            "create it first") from None
        finally:
            probe.close(timeout=0)
        consumer = KafkaConsumer(
            **base, group_id=config.group, enable_auto_commit=False, auto_offset_reset="earliest",
            isolation_level="read_committed", fetch_min_bytes=1, fetch_max_wait_ms=max(1, config.max_wait_ms),
            max_poll_records=config.max_batch_size * 4, max_partition_fetch_bytes=2 * config.max_record_bytes,
            metadata_max_age_ms=5_000)  # a join that saw no partitions (seen: empty assignment) is retried soon
    except KafkaError as err:
        raise explain_connection_error(settings, err) from None
    return consumer, make_producer


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    setup_logging(config.log_level, config.log_format, config.instance)
    settings = KafkaSettings.from_env()
    if config.check:
        return check(config, settings)
    artifact = load_artifact(config.model)
    metrics, health = WorkerMetrics(), Health()
    if config.metrics_port:
        try:
            serve(metrics, health, config.metrics_host, config.metrics_port)
        except OSError as err:
            raise UserError(f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}: {err}") from None
    encoder = Encoder.load(artifact.manifest.encoder, config.device, config.dtype, config.quantize)
    check_encoder(artifact, encoder.hidden_size)
    if config.max_batch_tokens < encoder.max_length:
        raise UserError(f"--max-batch-tokens {config.max_batch_tokens} is below the model's limit of "
                        f"{encoder.max_length} tokens per review")
    metrics.info.labels(artifact.model_id, str(encoder.device), encoder.dtype_name, config.guarantee).set(1)
    health.model_loaded = True
    log.info("model %s: encoder %s on %s (%s), guarantee %s, Kafka %s", artifact.model_id, encoder.name,
             encoder.device, encoder.dtype_name, config.guarantee, settings.describe())
    consumer, make_producer = connect(config, settings)
    lag = LagMonitor(settings, config.group, metrics, health)
    lag.start()
    inference = InferenceStage(encoder, TorchHead(artifact.estimator, encoder.device))
    try:
        Worker(config, encoder, artifact, inference, metrics, health, consumer, make_producer).run()
    except KafkaError as err:
        raise explain_connection_error(settings, err) from None
    finally:
        lag.stop()
    log.info("stopped cleanly")
    return 0


def cli() -> None:
    """The `sentiment-worker` console script."""
    run(main)


if __name__ == "__main__":
    cli()
