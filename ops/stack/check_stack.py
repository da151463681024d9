"""What make stack-test checks from outside the compose stack: topics and results through Kafka's
host listener (kcat), workers and rates through Prometheus' HTTP API. Each command polls until its
check holds or its time is up, prints one line, and exits non-zero on failure. Standard library only.

  topics BOOTSTRAP PARTITIONS         reviews and reviews.classified with PARTITIONS, reviews.dlq with 1
  workers-up PROMETHEUS_URL N         exactly N targets of job sentiment-worker, all up
  results BOOTSTRAP REVIEWS_TSV       one result per labeled row (read_committed), well formed; no dead letter
  rate PROMETHEUS_URL                 sum(rate(sentiment_worker_messages_classified_total[1m])) > 0
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable

TIMEOUT_S = 300


class CheckFailed(Exception):
    pass


def poll(check: Callable[[], str], timeout_s: float = TIMEOUT_S) -> str:
    """Retries `check` (which raises CheckFailed while it does not hold) until it returns or time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check()
        except CheckFailed:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def kcat(*args: str) -> str:
    result = subprocess.run(["kcat", *args], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise CheckFailed(f"kcat {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def records(bootstrap: str, topic: str) -> list[str]:
    """Every committed value of `topic`, from the beginning (transactional results: read_committed)."""
    out = kcat("-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-e", "-q", "-f", "%s\n",
               "-X", "isolation.level=read_committed")
    return [line for line in out.splitlines() if line]


def topics(bootstrap: str, partitions: str) -> str:
    want = {"reviews": int(partitions), "reviews.classified": int(partitions), "reviews.dlq": 1}

    def check() -> str:
        meta = json.loads(kcat("-L", "-J", "-b", bootstrap))
        have = {t["topic"]: len(t["partitions"]) for t in meta["topics"] if t["topic"] in want}
        if have != want:
            raise CheckFailed(f"topics {have}, want {want}")
        return " ".join(f"{name}:{n}" for name, n in sorted(have.items()))

    return poll(check, 60)


def prometheus(url: str, query: str) -> list[dict]:
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': query})}",
                                    timeout=10) as response:
            return json.load(response)["data"]["result"]
    except OSError as err:
        raise CheckFailed(f"Prometheus at {url}: {err}") from None


def workers_up(url: str, workers: str) -> str:
    def check() -> str:
        targets = prometheus(url, 'up{job="sentiment-worker"}')
        up = sorted(t["metric"]["instance"] for t in targets if t["value"][1] == "1")
        if len(targets) != int(workers) or len(up) != int(workers):
            raise CheckFailed(f"{len(up)} of {len(targets)} worker targets up, want {workers}")
        return " ".join(up)

    return poll(check)


def labeled_rows(path: str) -> int:
    with open(path, encoding="utf-8") as rows:
        return sum(1 for line in rows if line.rstrip("\n").rpartition("\t")[2] in ("0", "1"))


def results(bootstrap: str, reviews: str) -> str:
    expected = labeled_rows(reviews)

    def check() -> str:
        values = records(bootstrap, "reviews.classified")
        if len(values) < expected:
            raise CheckFailed(f"{len(values)} of {expected} results")
        return ""

    poll(check)
    found = [json.loads(v) for v in records(bootstrap, "reviews.classified")]
    ids = {r["id"] for r in found}
    if len(ids) != expected:
        raise CheckFailed(f"{len(ids)} distinct ids among {len(found)} results, want {expected}")
    for r in found:
        if r["label"] not in ("positive", "negative") or not 0 <= r["score"] <= 1 or "@" not in r["model"]:
            raise CheckFailed(f"malformed result {r}")
    dead = records(bootstrap, "reviews.dlq")
    if dead:
        raise CheckFailed(f"{len(dead)} dead letters, none expected: {dead[0][:300]}")
    right = sum((r["label"] == "positive") == (r["meta"]["label"] == 1) for r in found)
    accuracy = right / len(found)
    if accuracy < 0.7:
        raise CheckFailed(f"accuracy {accuracy:.2f} on the producer's labeled reviews: the head did not learn")
    return f"{len(ids)}/{expected} classified by {found[0]['model']}, accuracy {accuracy:.2f}"


def rate(url: str) -> str:
    def check() -> str:
        series = prometheus(url, "sum(rate(sentiment_worker_messages_classified_total[1m]))")
        value = float(series[0]["value"][1]) if series else 0.0
        if value <= 0:
            raise CheckFailed(f"classified rate {value}/s")
        return f"{value:.1f}/s"

    return poll(check, 120)


def main(argv: list[str]) -> int:
    commands = {"topics": topics, "workers-up": workers_up, "results": results, "rate": rate}
    if len(argv) < 2 or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        print(commands[argv[0]](*argv[1:]))
    except CheckFailed as err:
        print(f"{argv[0]}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
