"""Creating topics that are missing: the producer's --partitions and the test/benchmark harness share it."""

from __future__ import annotations

import contextlib

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from contract.kafka import KafkaSettings


def create_topics(settings: KafkaSettings, partitions: dict[str, int], client_id: str) -> None:
    """Create each topic of `partitions` (name -> partition count) that does not exist yet, with the
    broker's default replication factor; an existing topic is left as it is."""
    admin = KafkaAdminClient(**settings.client_config(client_id))
    try:
        existing = set(admin.list_topics())
        for name, count in partitions.items():
            if name not in existing:
                with contextlib.suppress(TopicAlreadyExistsError):  # another client was quicker
                    admin.create_topics([NewTopic(name, count, replication_factor=-1)])
    finally:
        admin.close()
