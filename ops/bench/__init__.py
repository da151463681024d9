"""Benchmarks: the bare model's ceiling, the worker end to end through Kafka, the naive loop."""
