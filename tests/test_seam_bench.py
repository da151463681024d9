"""The GPU benchmark's worker loop (ops/bench/seam.py): the real Worker over Kafka in memory at the client
seam finishes a backlog with one result per record, everything committed, and a rate to report."""

from __future__ import annotations

from models.classifier import Classifier
from ops.bench.seam import OUT, worker_rate
from tests.conftest import labeled_sentences


def test_the_worker_loop_over_the_memory_seam_classifies_and_commits_every_record(tiny_artifact):
    classifier = Classifier.load(tiny_artifact, "cpu", "fp32")
    texts, _labels = labeled_sentences(50)
    rate, sent = worker_rate(classifier, texts, max_batch_size=32, max_batch_tokens=4096, records=700, partitions=3,
                               timeout_s=120)
    assert sent == {OUT: 700}  # one result each, nothing dead-lettered, nothing sent twice
    assert rate > 0
