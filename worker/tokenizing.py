"""The tokenizing stage: one thread that turns each job's texts (a poll, or a sort window's worth of
one) into token ids, so that the main thread goes on polling, publishing and committing while the
tokenizer (Rust, which releases the GIL) works. At GPU speed tokenizing on the main thread was its
largest single cost.

Jobs come back in the order they went in (one thread, one queue), so records of a partition
reach the batcher in offset order. A text the tokenizer fails on fails alone: that job is
tokenized again one text at a time and only the failing texts come back as errors.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from models.encoder import Tokens

Tokenize = Callable[[list[str]], Tokens]


@dataclass
class Tokenized:
    """One job's texts, tokenized: `ids[i]` is None where `errors` has i."""

    items: list[Any]  # what was submitted with the texts, in order
    ids: list[list[int] | None]
    truncated: list[bool]
    errors: dict[int, BaseException] = field(default_factory=dict)


class TokenizingStage:
    def __init__(self, tokenize: Tokenize) -> None:
        self.tokenize = tokenize
        self._todo: queue.SimpleQueue[tuple[list[Any], list[str]] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[Tokenized] = queue.SimpleQueue()
        self.busy = 0  # jobs submitted and not yet collected
        self._thread = threading.Thread(target=self._run, name="tokenizing", daemon=True)
        self._thread.start()

    def submit(self, items: list[Any], texts: list[str]) -> None:
        self.busy += 1
        self._todo.put((items, texts))

    def collect(self, timeout: float = 0.0) -> list[Tokenized]:
        """What is done, in submission order; waits up to `timeout` for the first one when none is."""
        out: list[Tokenized] = []
        try:
            if timeout > 0 and self.busy:
                out.append(self._done.get(timeout=timeout))
            while True:
                out.append(self._done.get_nowait())
        except queue.Empty:
            pass
        self.busy -= len(out)
        return out

    def close(self) -> None:
        self._todo.put(None)

    def _run(self) -> None:
        while (work := self._todo.get()) is not None:
            items, texts = work
            try:
                done = self._tokenized(items, texts)
            except BaseException as err:  # noqa: BLE001 - never leave a job unanswered: the loop waits for each
                failed = dict.fromkeys(range(len(texts)), err)
                done = Tokenized(items, [None] * len(texts), [False] * len(texts), failed)
            self._done.put(done)

    def _tokenized(self, items: list[Any], texts: list[str]) -> Tokenized:
        try:
            tokens = self.tokenize(texts)
            ids, truncated = list(tokens.ids), list(tokens.truncated)
            if len(ids) != len(texts) or len(truncated) != len(texts):
                raise ValueError(f"{len(ids)} rows of token ids for {len(texts)} texts")
            return Tokenized(items, ids, truncated)
        except Exception:  # noqa: BLE001 - find the texts at fault below
            pass
        done = Tokenized(items, [None] * len(texts), [False] * len(texts))
        for i, text in enumerate(texts):
            try:
                one = self.tokenize([text])
                done.ids[i], done.truncated[i] = one.ids[0], one.truncated[0]
            except Exception as err:  # noqa: BLE001 - this text's own failure: a dead letter
                done.errors[i] = err
        return done
