"""`make demo`: the whole system on one machine, end to end, with a summary at the end.

Trains the head when the artifact is missing (DistilBERT when the hub is reachable, else the
offline encoder, which says so loudly), starts a worker with metrics, streams SST-2 dev
reviews (or the project's own small set when SST-2 cannot be had) plus a few malformed
records, shows live progress, and prints records, throughput, latency, accuracy and dead
letters. Everything it started is stopped, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from contract.cli import UserError, run
from contract.kafka import KafkaSettings, explain_connection_error
from contract.records import encode_review
from contract.review_files import ReviewRow, read_reviews
from models.datasets import resolve
from ops.harness import ROOT, Topics, WorkerProcess, free_port, publish, read

OWN_REVIEWS = ROOT / "ops" / "demo_reviews.tsv"
MALFORMED = [b"\xff\xfe not utf-8", b'{"text": "broken json', b'{"title": "no text field"}', b'{"text": 42}']


def say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def find_reviews() -> tuple[str, Path]:
    """(training data, file to stream): SST-2 when it can be had, else the project's own reviews."""
    try:
        return "sst2", resolve("sst2-dev")
    except UserError as err:
        say(f"SST-2 cannot be had ({err}); using the project's own {OWN_REVIEWS.name}")
        return str(OWN_REVIEWS), OWN_REVIEWS


def ensure_artifact(path: Path, train_data: str) -> None:
    if (path / "manifest.json").is_file():
        say(f"model artifact {path} is there")
        return
    say(f"training the head into {path} (DistilBERT [CLS] + logistic regression on every training sentence)")
    subprocess.run([sys.executable, "-m", "models", "train", "--data", train_data, "--out", str(path),
                    "--limit", "0"], cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.demo", description=__doc__)
    parser.add_argument("--model", default=str(ROOT / "models" / "artifacts" / "sst2"))
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="stream only the first N reviews")
    parser.add_argument("--metrics-port", type=int, default=9108)
    args = parser.parse_args(argv)
    settings = KafkaSettings.from_env()
    train_data, stream_file = find_reviews()
    ensure_artifact(Path(args.model), train_data)

    rows = [r for r in read_reviews(str(stream_file)) if isinstance(r, ReviewRow)]
    rows = rows[: args.limit] if args.limit else rows
    run_id = time.strftime("demo-%H%M%S")
    try:
        topics = Topics(settings).create(args.partitions)
        already = _end(settings, topics.output)
    except Exception as err:  # a broker problem at the first contact
        raise explain_connection_error(settings, err) from None
    port = args.metrics_port if args.metrics_port and _free(args.metrics_port) else free_port()
    log = ROOT / ".local" / "demo-worker.log"
    log.parent.mkdir(exist_ok=True)
    say(f"starting a worker (metrics on http://127.0.0.1:{port}/metrics, log {log})")
    with WorkerProcess(Path(args.model), topics, metrics_port=port, log=log) as worker:
        worker.wait_ready(timeout=300)
        say(f"streaming {len(rows)} reviews from {stream_file.name} + {len(MALFORMED)} malformed records")
        values = [encode_review(f"{run_id}-{r.line}", r.text, {"label": r.label}) for r in rows]
        keys = [f"{run_id}-{r.line}".encode() for r in rows]
        started = time.time()
        publish(settings, topics.input, values + MALFORMED, keys + [run_id.encode()] * len(MALFORMED))
        records = [r for r in read(settings, topics.output, already + len(rows), timeout=600,
                                   progress="classified")
                   if json.loads(r.value)["id"].startswith(run_id)]
        seconds = time.time() - started
        dead = [json.loads(r.value) for r in read(settings, topics.dlq, 0, timeout=3, settle=2)
                if r.key == run_id.encode()]
        inputs = {r.key.decode(): r.timestamp / 1000  # this run's reviews are keyed by their id
                  for r in read(settings, topics.input, 0, timeout=3, settle=2)
                  if r.key and r.key.startswith(f"{run_id}-".encode())}
        scrape = worker.metrics()
        assert worker.terminate() == 0, worker.tail()
    summarize(records, dead, inputs, seconds, port, scrape)
    return 0


def _free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _end(settings: KafkaSettings, topic: str) -> int:
    """Messages already in `topic` (from earlier runs), so that this run's are counted on top."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**settings.client_config("demo-offsets"))
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
    ends = consumer.end_offsets(parts) if parts else {}
    consumer.close()
    return sum(ends.values())


def summarize(records: list, dead: list[dict], inputs: dict[str, float], seconds: float, port: int,
              scrape: str) -> None:
    results = [json.loads(r.value) for r in records]
    latencies = [b["classified_at"] - inputs[b["id"]] for b in results if b["id"] in inputs]
    labeled = [b for b in results if (b.get("meta") or {}).get("label") is not None]
    correct = sum((b["label"] == "positive") == (b["meta"]["label"] == 1) for b in labeled)
    model = results[0]["model"] if results else "?"
    info = next((line for line in scrape.splitlines() if line.startswith("sentiment_worker_info{")), "")
    print("\n=== demo summary ===")
    print(f"model               {model}   {info[len('sentiment_worker_info'):].rsplit(' ', 1)[0]}")
    print(f"records classified  {len(results)} in {seconds:.1f} s  ({len(results) / max(seconds, 1e-9):.1f}/s)")
    if latencies:
        print(f"latency p50 / p99   {np.percentile(latencies, 50) * 1000:.0f} ms / "
              f"{np.percentile(latencies, 99) * 1000:.0f} ms  (input timestamp to result)")
    if labeled:
        print(f"accuracy            {correct / len(labeled):.3f} on {len(labeled)} labeled reviews")
    print(f"dead letters        {len(dead)}: " + ", ".join(sorted(d["error"] for d in dead)))
    print(f"metrics were served http://127.0.0.1:{port}/metrics")


if __name__ == "__main__":
    run(main)
