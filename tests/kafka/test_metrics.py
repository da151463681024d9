"""Metrics of a running worker, read by a scrape and by a real Prometheus server."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from ops.harness import WorkerProcess, free_port, publish, read
from tests.test_ops import DESIGN_NAMES

SECRET_TEXT = "zebra-quartz-unmistakable-review-text"


def series(scrape: str, name: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in scrape.splitlines()
            if line.startswith((name + " ", name + "{"))}


def total(scrape: str, name: str) -> float:
    return sum(series(scrape, name).values())


def stream_values(n: int, bad: int) -> list[bytes]:
    good = [json.dumps({"id": f"m{i}", "text": f"{SECRET_TEXT} number {i} was a fine film"}).encode()
            for i in range(n - bad)]
    return good + [b'{"text": 5}'] * bad


def test_scrape_after_5000_records_has_every_metric_with_sensible_values(tiny_artifact, topics, env,
                                                                         kafka_settings, tmp_path):
    topics.create(partitions=2)
    with WorkerProcess(tiny_artifact, topics, "--device", "cpu", env=env, metrics_port=free_port(),
                       log=tmp_path / "w.log") as worker:
        worker.wait_ready()
        publish(kafka_settings, topics.input, stream_values(5000, 10))
        read(kafka_settings, topics.output, 4990, timeout=120)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            scrape = worker.metrics()
            lag = series(scrape, "sentiment_worker_consumer_lag")
            if len(lag) == 2 and set(lag.values()) == {0.0} and \
                    total(scrape, "sentiment_worker_messages_classified_total") == 4990:
                break  # the lag gauge is refreshed every 5 s, after the commits
            time.sleep(1)
        health = [urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}{p}", timeout=5).status
                  for p in ("/healthz", "/readyz")]
    for name in DESIGN_NAMES:
        assert f"sentiment_worker_{name}" in scrape, name
    assert total(scrape, "sentiment_worker_messages_consumed_total") == 5000
    assert total(scrape, "sentiment_worker_messages_classified_total") == 4990
    assert series(scrape, "sentiment_worker_messages_dead_lettered_total") == {
        'sentiment_worker_messages_dead_lettered_total{reason="bad_type"}': 10.0}
    assert total(scrape, "sentiment_worker_end_to_end_latency_seconds_count") == 4990
    batches = total(scrape, "sentiment_worker_batch_size_count")
    assert 0 < batches <= 4990 and total(scrape, "sentiment_worker_batch_size_sum") == 4990
    assert total(scrape, "sentiment_worker_batch_tokens_count") == batches
    assert total(scrape, "sentiment_worker_inference_seconds_count") == batches
    assert total(scrape, "sentiment_worker_throughput_messages_per_second") > 0
    assert 0 < total(scrape, "sentiment_worker_padding_efficiency") <= 1
    assert total(scrape, "sentiment_worker_publish_errors_total") == 0
    assert total(scrape, "sentiment_worker_rebalances_total") >= 1
    lag = series(scrape, "sentiment_worker_consumer_lag")
    assert {k.split('partition="')[1].split('"')[0] for k in lag} == {"0", "1"} and set(lag.values()) == {0.0}
    [info] = series(scrape, "sentiment_worker_info")
    assert 'device="cpu"' in info and 'guarantee="at-least-once"' in info and 'model="tiny@' in info
    assert health == [200, 200]
    assert SECRET_TEXT not in scrape and "m1" not in scrape, "metrics must not expose message content"
    print("\nscrape after 5000 records:")
    for line in scrape.splitlines():
        if line.startswith(("sentiment_worker_throughput", "sentiment_worker_batch_size_bucket",
                            "sentiment_worker_end_to_end_latency_seconds_bucket", "sentiment_worker_padding")):
            print("  " + line)


def test_real_prometheus_scrapes_the_worker(tiny_artifact, topics, env, kafka_settings, tmp_path):
    binary = shutil.which("prometheus")
    if not binary:
        pytest.fail("prometheus is missing: make test installs Debian's package (ops/install-tools)")
    topics.create(partitions=3)
    worker_port, prom_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: sentiment-worker
    static_configs: [{{targets: ['127.0.0.1:{worker_port}']}}]
""")
    prometheus = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{prom_port}"],
                                  stdout=subprocess.DEVNULL, stderr=(tmp_path / "prom.log").open("wb"))

    def query(expr: str) -> list:
        url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())["data"]["result"]
        except OSError:
            return []

    try:
        with WorkerProcess(tiny_artifact, topics, "--device", "cpu", env=env, metrics_port=worker_port) as worker:
            worker.wait_ready()
            rate_ok = lag = []
            deadline = time.monotonic() + 90
            n = 0
            while time.monotonic() < deadline and not (rate_ok and len(lag) == 3):
                publish(kafka_settings, topics.input, stream_values(200, 0)[:200], rate=400)
                n += 200
                rate_ok = query("rate(sentiment_worker_messages_classified_total[1m]) > 0")
                lag = query("sentiment_worker_consumer_lag")
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
    assert rate_ok, "Prometheus saw no classification rate"
    assert {s["metric"]["partition"] for s in lag} == {"0", "1", "2"}
    assert {s["metric"]["topic"] for s in lag} == {topics.input}
