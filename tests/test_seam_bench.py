"""The GPU benchmark's worker loop (ops/bench/seam.py): the real Worker over Kafka in memory at the client
seam finishes a backlog larger than its in-flight cap (so it pauses and resumes) with exactly one result per
record, in each partition's offset order, everything committed, and a rate to report."""

from __future__ import annotations

import json
import sys

from models.classifier import Classifier
from ops.bench.seam import OUT, worker_rate
from tests.conftest import labeled_sentences


def test_the_worker_loop_over_the_memory_seam_classifies_and_commits_every_record(tiny_artifact):
    classifier = Classifier.load(tiny_artifact, "cpu", "fp32")
    texts, _labels = labeled_sentences(50)
    switch = sys.getswitchinterval()
    run = worker_rate(classifier, texts, max_batch_size=32, max_batch_tokens=4096, records=5000, partitions=3,
                      timeout_s=120)
    assert {topic for topic, _ in run.sent} == {OUT}  # nothing dead-lettered
    results = [json.loads(value) for _, value in run.sent]
    assert sorted(r["id"] for r in results) == sorted(f"r{i}" for i in range(5000))  # each exactly once
    for partition in range(3):
        offsets = [r["source"]["offset"] for r in results if r["source"]["partition"] == partition]
        assert offsets == sorted(offsets)
    # forward seconds within the measured span (one thread, one batch at a time: at most the span, plus the batches,
    # up to the inference depth, that ended before it and were collected in it)
    assert run.per_second > 0 and 0 < run.forward_busy <= 1.1
    assert sys.getswitchinterval() == switch  # the worker's GIL setting was for the run only
