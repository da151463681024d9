"""(a) The ceiling: the bare encoder (+ head) on pre-tokenized, length-sorted batches, no Kafka.
The forward step is the worker's own (`Classifier.score_ids`: pooling as the manifest says).

Batches are built by the worker's own batcher from an in-memory source, so this module
needs no Kafka client and also serves the GPU benchmark.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from models.classifier import Classifier
from models.encoder import Encoder
from worker.batcher import BatchCaps, BatchQueue, Pending, padded_tokens


@dataclass(frozen=True)
class CeilingResult:
    dtype: str
    max_batch_size: int
    records: int
    seconds: float
    padding_efficiency: float

    @property
    def per_second(self) -> float:
        return self.records / self.seconds


def batches(encoder: Encoder, texts: list[str], max_batch_size: int, max_batch_tokens: int,
            overhead_tokens: int | None) -> list[list[Pending]]:
    """Pre-tokenize, then cut the whole backlog into batches with the worker's batcher."""
    tokens = encoder.tokenize(texts)
    pool = BatchQueue(BatchCaps(max_batch_size, max_batch_tokens, 0.0, overhead_tokens))
    pool.append(Pending(("mem", i), ids, 0.0) for i, ids in enumerate(tokens.ids))
    out = []
    while batch := pool.take(now=1.0):
        out.append(batch)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(classifier: Classifier, texts: list[str], max_batch_size: int,
            max_batch_tokens: int = 8192, min_seconds: float = 3.0) -> CeilingResult:
    """Records/s over whole passes of `texts` (at least `min_seconds`), after one untimed pass that
    warms up every batch shape (kernel selection, allocator, caches)."""
    encoder = classifier.encoder
    work = batches(encoder, texts, max_batch_size, max_batch_tokens, classifier.batch_overhead_tokens)
    real = sum(p.length for b in work for p in b)
    padded = sum(padded_tokens(b) for b in work)
    for batch in work:
        classifier.score_ids([p.ids for p in batch])
    sync(encoder.device)
    done, started = 0, time.perf_counter()
    while True:
        for batch in work:
            classifier.score_ids([p.ids for p in batch])
            done += len(batch)
        sync(encoder.device)
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return CeilingResult(encoder.dtype_name, max_batch_size, done, elapsed, real / padded)
