"""The Python API: an artifact's encoder and head, scoring texts as the worker does.

    from models.classifier import Classifier
    classifier = Classifier.load("models/artifacts/sst2", device="cpu")
    for p in classifier.predict(["a gripping, beautiful film", "two hours I want back"]):
        print(p.label, p.score)

`score_ids` is the worker's per-batch step (pooled features, then the head, on the device);
`predict` tokenizes the same way and cuts length-sorted batches under the worker's default
caps, so its scores are the worker's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.cli import UserError
from contract.records import label_of
from models.artifact import Artifact, load_artifact
from models.encoder import Encoder, length_batches
from models.head import TorchHead

BATCH_CAPS = {"cpu": (64, 8192), "cuda": (256, 32768)}  # rows, padded tokens: DESIGN.md's defaults
# A batch's fixed cost in padded tokens (worker/batcher.py cuts where padding would cost more). Random DistilBERT,
# bf16, this project's 2-core CPU: alone 3.6 ms + 0.25 ms per padded token (rows 1-64 x lengths 8-64, least
# squares), inside the worker at 50 % load 21 ms + 0.37 ms per token (167 batches), so 14-57 tokens; 32, 64 and 128
# gave p50 0.37-0.58, 0.25-0.27 and 0.54-0.93 s there. The H200 (ops/bench/gpu-results-h200.json, fp16): 2.7 ms a
# batch of one row, 4.2 ms for 128 rows, 6.3 ms for 256 (~0.4 µs per padded token), so 5000-7000 tokens.
BATCH_OVERHEAD_TOKENS = {"cpu": 64, "cuda": 4096}


@dataclass(frozen=True)
class Prediction:
    label: str  # "positive" | "negative"
    score: float  # P(positive)


class Classifier:
    def __init__(self, encoder: Encoder, head: TorchHead, model_id: str = "") -> None:
        if head.hidden_size != encoder.hidden_size:
            raise UserError(f"encoder hidden size {encoder.hidden_size} does not match the head's {head.hidden_size}")
        self.encoder, self.head, self.model_id = encoder, head, model_id
        self.max_rows, self.max_tokens = BATCH_CAPS.get(encoder.device.type, BATCH_CAPS["cpu"])
        self.batch_overhead_tokens = BATCH_OVERHEAD_TOKENS.get(encoder.device.type, BATCH_OVERHEAD_TOKENS["cpu"])

    @classmethod
    def load(cls, artifact: str | Path | Artifact, device: str = "auto", dtype: str = "auto",
             quantize: str = "none") -> Classifier:
        """The artifact's head on its encoder: the recorded revision, pooled as the manifest says."""
        if not isinstance(artifact, Artifact):
            artifact = load_artifact(artifact)
        m = artifact.manifest
        encoder = Encoder.load(m.encoder, device, dtype, quantize, pooling=m.pooling, revision=m.encoder_revision)
        return cls(encoder, TorchHead(artifact.head, encoder.device), artifact.model_id)

    def score_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """P(positive) of one batch of token ids (the worker's forward step)."""
        return self.head(self.encoder.features(ids)).cpu().numpy()

    def scores(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """P(positive) per text, in input order."""
        tokens = self.encoder.tokenize(texts)
        out = np.zeros(len(texts), dtype=np.float32)
        for batch in length_batches(tokens.lengths, self.max_rows, self.max_tokens):
            out[batch] = self.score_ids([tokens.ids[i] for i in batch])
            if progress:
                progress(len(batch))
        return out

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        return [Prediction(label_of(score), score) for score in self.scores(texts).tolist()]
