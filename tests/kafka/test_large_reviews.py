"""Memory under the largest reviews the contract accepts: 1,000 reviews of 500 KiB through one worker
stay within +512 MiB of the ready worker's resident memory (tokenizing is bounded, and so are the
bytes held in flight). Without the character bound on tokenizing, this run does not finish within
pytest's 10 minutes here."""

from __future__ import annotations

import random
import shutil
import subprocess
import time

import psutil
import pytest

from ops.harness import WorkerProcess, free_port, read
from tests.conftest import NEGATIVE, POSITIVE
from tests.faults.conftest import PeakMemory

COUNT = 1000
SIZE = 500 * 1024  # under the default cap of 512 KiB
HEADROOM = 512 << 20


def review(rng: random.Random, i: int) -> bytes:
    """Plain text of SIZE bytes: a few KiB of drawn sentences, repeated."""
    chunk = f"review {i} : " + " ; ".join(rng.choice(POSITIVE + NEGATIVE) for _ in range(100)) + " . "
    return (chunk * (SIZE // len(chunk) + 1)).encode()[:SIZE]


@pytest.mark.long  # about 2.5 minutes here: 500 MB through kcat, the broker and one worker
def test_rss_stays_within_512_mib_of_the_ready_worker(tiny_artifact, topics, env, kafka_bootstrap, kafka_settings,
                                                      tmp_path, summary_line):
    kcat = shutil.which("kcat")
    if not kcat:
        pytest.fail("kcat is missing: make test installs it (ops/install-tools)")
    topics.create()
    with WorkerProcess(tiny_artifact, topics, "--device", "cpu", env=env, metrics_port=free_port(),
                       log=tmp_path / "w.log") as worker:
        worker.wait_ready()
        time.sleep(2)
        ready = psutil.Process(worker.proc.pid).memory_info().rss
        peak = PeakMemory(worker.proc.pid)
        peak.start()
        started = time.monotonic()
        producer = subprocess.Popen([kcat, "-P", "-b", kafka_bootstrap, "-t", topics.input],
                                    stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
        rng = random.Random(0)
        for i in range(COUNT):
            producer.stdin.write(review(rng, i) + b"\n")
        producer.stdin.close()
        assert producer.wait(timeout=300) == 0
        results = read(kafka_settings, topics.output, COUNT, timeout=600)
        seconds = time.monotonic() - started
        high = peak.stop()
        assert worker.alive(), worker.tail()
        truncated = worker.metric("sentiment_worker_messages_truncated_total")
    mib = 1 << 20
    summary_line(f"500 KiB reviews: {len(results)}/{COUNT} classified in {seconds:.0f} s, worker RSS ready="
                 f"{ready / mib:.0f} MiB peak={high / mib:.0f} MiB (+{(high - ready) / mib:.0f} MiB, "
                 f"limit +{HEADROOM // mib}), truncated={truncated:.0f}")
    assert len(results) == COUNT
    assert truncated == COUNT
    assert high - ready <= HEADROOM
