"""Training features: labeled data streamed in chunks, each chunk's pooled features cached on disk.

Encoding is the slow part of training (67k SST-2 phrases take many minutes on a CPU). joblib's
`Memory` keeps each chunk's features under a key of encoder, revision, pooling, dtype, the
data's sha256 and the chunk's place, so a second `train` with another `--limit` or C grid reads
them back instead of encoding again. Chunks are whole (a `--limit` inside one encodes all of
it), so that any later limit finds them. Only the features are held in memory, not the data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from joblib import Memory

from models.datasets import LabeledFile
from models.encoder import Encoder

CHUNK_ROWS = 512
FEATURES_VERSION = 1  # part of the key: bump it when a code change alters the features of the same inputs


@dataclass(frozen=True)
class Features:
    x: np.ndarray  # rows × hidden, float32
    y: np.ndarray  # labels 0/1
    encoded_rows: int
    cached_rows: int


def _encode(key: tuple, encoder: Encoder, texts: list[str], progress: Callable[[int], None] | None) -> np.ndarray:
    """One chunk's features; `key` alone identifies them (the other arguments are not hashed)."""
    return encoder.embed(texts, progress=progress)


def labeled_features(encoder: Encoder, data: LabeledFile, limit: int | None, cache_dir: Path | None,
                     progress: Callable[[int], None] | None = None) -> Features:
    """Features and labels of the first `limit` rows (all when None), from the cache where it has them."""
    ignored = ["encoder", "texts", "progress"]
    encode = Memory(cache_dir, verbose=0).cache(_encode, ignore=ignored) if cache_dir else _encode
    xs: list[np.ndarray] = []
    ys: list[int] = []
    encoded = cached = 0
    for index, (texts, labels) in enumerate(data.chunks(CHUNK_ROWS)):
        key = (FEATURES_VERSION, encoder.name, encoder.revision, encoder.pooling, encoder.dtype_name,
               data.sha256, index, CHUNK_ROWS)
        hit = cache_dir is not None and encode.check_call_in_cache(key, encoder, texts, None)
        xs.append(encode(key, encoder, texts, progress))
        ys.extend(labels)
        if hit:
            cached += len(texts)
            if progress:
                progress(len(texts))
        else:
            encoded += len(texts)
        if limit and len(ys) >= limit:
            break
    x = np.concatenate(xs)[:limit or None]
    return Features(x, np.asarray(ys[:limit or None]), encoded, cached)
