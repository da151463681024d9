"""Publishing at a steady rate: the producer's --rate and the test/benchmark harness share it."""

from __future__ import annotations

import time


class Pacer:
    """Call `tick()` after each record: it sleeps so that N records take N / rate seconds (0 = no pacing).
    Pacing by the schedule, not by the gaps, lets a late record's delay be made up by the next ones."""

    def __init__(self, rate: float) -> None:
        if rate < 0:
            raise ValueError("a rate cannot be negative")
        self.rate, self.count, self.started = rate, 0, time.perf_counter()

    def tick(self) -> None:
        self.count += 1
        if self.rate:
            delay = self.started + self.count / self.rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
