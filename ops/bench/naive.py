"""(c) The naive way, as the tutorial writes it, in a Kafka consume loop: fp32, one record at a
time: tokenize, forward, [CLS], scikit-learn predict_proba, produce and wait, commit."""

from __future__ import annotations

import json
import time

import torch
from kafka import KafkaConsumer, KafkaProducer

from contract.kafka import KafkaSettings
from models.artifact import Artifact
from models.encoder import Encoder


def run_naive(settings: KafkaSettings, encoder: Encoder, artifact: Artifact, topic: str, out_topic: str,
              count: int, timeout_s: float = 300) -> float:
    """Classify `count` records of `topic` one by one; returns records per second (after the first). Gives up
    after `timeout_s`: its kafka-python consumer once spun for over 10 minutes without joining its group."""
    consumer = KafkaConsumer(topic, **settings.client_config("bench-naive"), group_id=f"naive-{time.time_ns()}",
                             auto_offset_reset="earliest", enable_auto_commit=False, max_poll_records=1)
    producer = KafkaProducer(**settings.client_config("bench-naive"), acks="all")
    estimator = artifact.load_estimator()  # the tutorial's scikit-learn head, from head.joblib
    try:
        done, started, deadline = 0, None, time.monotonic() + timeout_s
        while done < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the naive consumer classified {done} of {count} records in {timeout_s:.0f} s "
                                   f"(joined its group: {bool(consumer.assignment())})")
            for records in consumer.poll(timeout_ms=1000).values():
                for record in records:
                    text = json.loads(record.value)["text"]
                    ids = encoder.tokenizer(text, return_tensors="pt", truncation=True)
                    with torch.no_grad():
                        cls = encoder.model(**ids).last_hidden_state[:, 0, :].numpy()
                    score = float(estimator.predict_proba(cls)[0, 1])
                    producer.send(out_topic, json.dumps({"score": score}).encode()).get(timeout=30)
                    consumer.commit()
                    done += 1
                    if started is None:
                        started = time.perf_counter()
        elapsed = time.perf_counter() - started
    finally:
        consumer.close()
        producer.close()
    return (done - 1) / elapsed
