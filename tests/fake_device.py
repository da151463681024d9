"""`python -m tests.fake_device <worker args>`: the real worker (`worker.__main__.main`) with its
forward pass wrapped, so that tests against a real broker can make the model fail on purpose:

- FAKE_DEVICE_RAISE_ON=WORD: the forward raises for any batch holding a review with WORD;
- FAKE_DEVICE_NAN_ON=WORD: rows of reviews with WORD score NaN;
- FAKE_DEVICE_BROKEN=1: every forward call raises (the probe's too), as a device that is gone.

A review is recognised by WORD's token ids (without [CLS]/[SEP]) appearing in its row, so WORD must be
one the tokenizer knows (the tiny test encoder knows the words of tests/conftest.py's sentences).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

import worker.__main__ as entry
from contract.cli import run
from models.encoder import Encoder
from worker.inference import Forward, InferenceStage

LOADED: list[Encoder] = []


def holds(row: Sequence[int], part: list[int]) -> bool:
    return any(list(row[i : i + len(part)]) == part for i in range(len(row) - len(part) + 1))


def marker(variable: str) -> list[int] | None:
    """The token ids of the word in `variable`; an unknown word ([UNK], in every row) stops the worker here."""
    word = os.environ.get(variable)
    if not word:
        return None
    encoder = LOADED[0]
    ids = encoder.tokenize([word]).ids[0][1:-1]
    if encoder.tokenizer.unk_token_id in ids:
        raise SystemExit(f"{variable}={word!r} is not in the tokenizer's vocabulary")
    return ids


def faulty(forward: Forward) -> Forward:
    boom, nan = marker("FAKE_DEVICE_RAISE_ON"), marker("FAKE_DEVICE_NAN_ON")
    broken = os.environ.get("FAKE_DEVICE_BROKEN") == "1"

    def wrapped(ids: Sequence[Sequence[int]]) -> np.ndarray:
        if broken:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (fake)")
        if boom and any(holds(row, boom) for row in ids):
            raise RuntimeError("CUDA error: device-side assert triggered (fake, on a marked review)")
        scores = np.array(forward(ids), dtype=np.float64)
        if nan:
            scores[[i for i, row in enumerate(ids) if holds(row, nan)]] = np.nan
        return scores

    return wrapped


class FakeDevice(InferenceStage):
    def __init__(self, forward: Forward, *args, **kwargs) -> None:
        LOADED.append(forward.__self__.encoder)  # the worker passes Classifier.score_ids: its encoder tokenizes
        super().__init__(faulty(forward), *args, **kwargs)


if __name__ == "__main__":
    entry.InferenceStage = FakeDevice
    run(entry.main)
