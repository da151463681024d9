"""The device stage: one thread that runs encoder + head on batches, so that polling,
decoding, tokenizing and publishing on the main thread overlap with the forward pass.

At most `depth` batches are queued or running, which keeps the device busy without letting
work pile up ahead of it. A failed forward is the records' fault only if a forward without
them succeeds on the same device: the batch is split in halves until the rows that fail
alone are found (`model_error`); a non-finite score re-runs its own row. When
`max_failures` forward calls fail in a row, and a minimal probe input fails too, the device
is broken, not the records: the stage raises `DeviceBroken` on the main thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from worker.batcher import Pending

Forward = Callable[[Sequence[Sequence[int]]], np.ndarray]  # token ids -> P(positive) per row


class DeviceBroken(Exception):
    """Forward calls keep failing whatever the input: another replica should take over."""


@dataclass
class Scored:
    batch: list[Pending]
    scores: np.ndarray  # P(positive) per row; rows in `failed` carry no score
    seconds: float
    failed: dict[int, str] = field(default_factory=dict)  # row -> why the model failed on it alone


class InferenceStage:
    def __init__(self, forward: Forward, probe: Sequence[int], max_failures: int = 3, depth: int = 2) -> None:
        self.forward, self.probe, self.max_failures, self.depth = forward, list(probe), max_failures, depth
        self._todo: queue.Queue[list[Pending] | None] = queue.Queue()
        self._done: queue.Queue[Scored | BaseException] = queue.Queue()
        self._busy = 0
        self._failures = 0  # forward calls failed in a row
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (batch := self._todo.get()) is not None:
            try:
                started = time.perf_counter()
                scores = np.full(len(batch), np.nan)
                failed: dict[int, str] = {}
                self._score([p.ids for p in batch], list(range(len(batch))), scores, failed)
                self._done.put(Scored(batch, scores, time.perf_counter() - started, failed))
            except BaseException as err:  # surfaced on the main thread, which stops the worker
                self._done.put(err)

    def _call(self, ids: Sequence[Sequence[int]]) -> np.ndarray | Exception:
        try:
            out = np.asarray(self.forward(ids), dtype=np.float64).reshape(len(ids))
        except Exception as err:  # noqa: BLE001 - any failure (CUDA out of memory included) is judged below
            self._failures += 1
            if self._failures >= self.max_failures:
                self._check_device(err)
            return err
        self._failures = 0
        return out

    def _check_device(self, err: Exception) -> None:
        """Enough failures in a row: a minimal input that always worked decides between records and device."""
        try:
            self.forward([self.probe])
        except Exception as probe_err:  # noqa: BLE001
            raise DeviceBroken(f"{self._failures} forward calls failed in a row, a probe too: "
                               f"{type(err).__name__}: {err}") from probe_err
        self._failures = 0

    def _score(self, ids: list[Sequence[int]], rows: list[int], scores: np.ndarray, failed: dict[int, str]) -> None:
        """Fill `scores` for `rows`; split a failing call in halves until the failing rows stand alone."""
        out = self._call([ids[r] for r in rows])
        if isinstance(out, Exception):
            if len(rows) == 1:
                failed[rows[0]] = f"{type(out).__name__}: {out}"[:500]
                return
            halves = (rows[: len(rows) // 2], rows[len(rows) // 2 :])
            for half in halves:
                self._score(ids, half, scores, failed)
            return
        scores[rows] = out
        for row in rows:
            if not np.isfinite(scores[row]) or not 0.0 <= scores[row] <= 1.0:
                alone = self._call([ids[row]]) if len(rows) > 1 else out
                if isinstance(alone, Exception):
                    failed[row] = f"{type(alone).__name__}: {alone}"[:500]
                elif not np.isfinite(alone[0]):
                    failed[row] = f"the model gave a non-finite score ({alone[0]})"
                else:
                    scores[row] = alone[0]

    @property
    def busy(self) -> int:
        """Batches queued or running."""
        return self._busy

    def has_room(self) -> bool:
        return self._busy < self.depth

    def submit(self, batch: list[Pending]) -> None:
        self._busy += 1
        self._todo.put(batch)

    def collect(self, timeout: float = 0.0) -> list[Scored]:
        """Finished batches; waits up to `timeout` for the first one. Raises DeviceBroken."""
        out: list[Scored] = []
        try:
            item = self._done.get(timeout=timeout) if timeout > 0 else self._done.get_nowait()
            while True:
                if isinstance(item, BaseException):
                    raise item
                self._busy -= 1
                out.append(item)
                item = self._done.get_nowait()
        except queue.Empty:
            return out

    def close(self) -> None:
        self._todo.put(None)
        self._thread.join(timeout=30)
