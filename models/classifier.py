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
