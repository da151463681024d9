"""The end-to-end latency histogram, observed a step's results at a time, must expose what a Prometheus
histogram observed one value at a time exposes: same buckets (`le` inclusive), count and sum."""

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker.metrics import SECONDS_BUCKETS, BulkHistogram, WorkerMetrics


def test_bulk_observations_expose_what_single_ones_do():
    values = [0.0, 0.005, 0.0050001, 0.01, 0.3, 1.0, 2.5, 59.9, 60.0, 61.0, 1e6, *np.linspace(0, 70, 500)]
    one_by_one, at_once = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("latency_seconds", "doc", buckets=SECONDS_BUCKETS, registry=one_by_one)
    bulk = BulkHistogram("latency_seconds", "doc", SECONDS_BUCKETS, at_once)
    for value in values:
        reference.observe(value)
    bulk.observe(np.array(values[:7]))
    bulk.observe(np.array(values[7:]))
    bulk.observe(np.array([]))  # a step without results
    expected, got = samples(one_by_one), samples(at_once)
    assert got.pop("latency_seconds_sum") == pytest.approx(expected.pop("latency_seconds_sum"), rel=1e-12)
    assert got == expected  # every bucket (cumulative, `le` inclusive) and the count


def samples(registry: CollectorRegistry) -> dict[str, float]:
    exposed = text_string_to_metric_families(generate_latest(registry).decode())
    return {f"{s.name}{s.labels.get('le', '')}": s.value for family in exposed for s in family.samples}


def test_the_worker_exposes_latency_under_its_design_name():
    metrics = WorkerMetrics()
    metrics.latency.observe(np.array([0.02, 0.2, 20.0]))
    text = generate_latest(metrics.registry).decode()
    assert 'sentiment_worker_end_to_end_latency_seconds_bucket{le="0.025"} 1.0' in text
    assert 'sentiment_worker_end_to_end_latency_seconds_bucket{le="+Inf"} 3.0' in text
    assert "sentiment_worker_end_to_end_latency_seconds_count 3.0" in text
