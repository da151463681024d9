"""The device stage: one thread that runs encoder + head on batches, so that polling,
decoding, tokenizing and publishing on the main thread overlap with the forward pass.

At most `depth` batches are queued or running, which keeps the device busy without
letting work pile up ahead of it.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from models.encoder import Encoder
from models.head import TorchHead
from worker.batcher import Pending


@dataclass
class Scored:
    batch: list[Pending]
    scores: np.ndarray  # P(positive) per row
    seconds: float


class InferenceStage:
    def __init__(self, encoder: Encoder, head: TorchHead, depth: int = 2) -> None:
        self.encoder, self.head, self.depth = encoder, head, depth
        self._todo: queue.Queue[list[Pending] | None] = queue.Queue()
        self._done: queue.Queue[Scored | BaseException] = queue.Queue()
        self._busy = 0
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (batch := self._todo.get()) is not None:
            try:
                started = time.perf_counter()
                scores = self.head(self.encoder.features([p.ids for p in batch])).cpu().numpy()
                self._done.put(Scored(batch, scores, time.perf_counter() - started))
            except BaseException as err:  # surfaced on the main thread, which stops the worker
                self._done.put(err)

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
        """Finished batches; waits up to `timeout` for the first one."""
        out: list[Scored] = []
        try:
            item = self._done.get(timeout=timeout) if timeout > 0 else self._done.get_nowait()
            while True:
                if isinstance(item, BaseException):
                    raise RuntimeError(f"inference failed: {item}") from item
                self._busy -= 1
                out.append(item)
                item = self._done.get_nowait()
        except queue.Empty:
            return out

    def close(self) -> None:
        self._todo.put(None)
        self._thread.join(timeout=30)
