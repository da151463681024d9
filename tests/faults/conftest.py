"""Fault scenarios print one summary line each: sent, classified, dead-lettered, lost, duplicated.
The lines are collected and shown at the end of the run (also when output is captured)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections import Counter

import psutil
import pytest

LINES: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:
    if LINES:
        terminalreporter.section("fault scenarios")
        for line in LINES:
            terminalreporter.write_line(line)


@pytest.fixture
def summary(kafka_client):
    """summary(name, sent_ids, result_ids, dead_count, extra) -> (lost, duplicated), recorded for the report
    (the name says which Kafka client the worker used, when not the default)."""
    client = "" if kafka_client == "kafka-python" else f" [{kafka_client}]"

    def record(name: str, sent: set[str], results: list[str], dead: int = 0, extra: str = "") -> tuple[int, int]:
        got = Counter(results)
        lost = len(sent - set(got))
        duplicated = sum(got.values()) - len(got)
        LINES.append(f"{name}{client}: sent={len(sent)} classified={len(got)} dead-lettered={dead} lost={lost} "
                     f"duplicated={duplicated}{extra}")
        return lost, duplicated

    return record


@pytest.fixture
def local_broker() -> str:
    """The local broker script, for scenarios that stop the broker or change topic settings."""
    script = os.environ.get("KAFKA_LOCAL_BROKER")
    if not script:
        message = "needs the local broker that make test starts (KAFKA_LOCAL_BROKER)"
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return script


def broker(script: str, *args: str) -> None:
    subprocess.run([script, *args], check=True, timeout=180, stdout=subprocess.DEVNULL)


class PeakMemory(threading.Thread):
    """Samples a process's resident memory until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.2)

    def stop(self) -> int:
        self.running = False
        self.join(timeout=5)
        return self.peak
