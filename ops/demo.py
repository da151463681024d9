"""`make demo`: the whole system on one machine, end to end, with a summary at the end.

Trains the head when the artifact is missing (DistilBERT [CLS] when the hub is reachable, else
the offline encoder, which says so loudly, with mean pooling, what that sentence-transformers
model is trained for), starts a worker with metrics, streams SST-2 dev reviews (or the
project's own small set when SST-2 cannot be had) plus a few malformed records, shows live
progress, and prints records, throughput, latency, accuracy and dead letters. Accuracy is
counted only on reviews the head was not trained on (SST-2 dev against a head trained on SST-2
train; with the project's own reviews, a quarter of them held out of training), and says so;
when that cannot be vouched for, no score is printed. Everything it started is stopped, also on
Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.cli import UserError, run
from contract.kafka import KafkaSettings, explain_connection_error
from contract.records import encode_review
from contract.review_files import ReviewRow, read_reviews
from models.artifact import read_manifest
from models.checksums import sha256_file
from models.datasets import resolve
from models.encoder import DEFAULT_ENCODER, OFFLINE_HUB_NAME, hub_reachable, in_hub_cache
from ops.harness import ROOT, Topics, WorkerProcess, free_port, publish, read

OWN_REVIEWS = ROOT / "ops" / "demo_reviews.tsv"
MALFORMED = [b"\xff\xfe not utf-8", b'{"text": "broken json', b'{"title": "no text field"}', b'{"text": 42}']


def say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Plan:
    """What the head trains on, what is streamed, and which streamed reviews it never saw."""

    name: str  # the artifact's default name
    train_data: str  # `models train --data`
    stream: Path
    held_out: set[int] | None  # lines of `stream` kept out of training; None: all of them
    what: str  # how the held-out reviews came to be, for the summary


def plan_reviews() -> Plan:
    """SST-2 when it can be had (train on train, stream dev), else the project's own reviews, a
    quarter of each label held out of training."""
    try:
        return Plan("sst2", "sst2", resolve("sst2-dev"), None, "SST-2 dev; the head was trained on SST-2 train")
    except UserError as err:
        say(f"SST-2 cannot be had ({err}); using the project's own {OWN_REVIEWS.name}")
    rows = [r for r in read_reviews(str(OWN_REVIEWS)) if isinstance(r, ReviewRow)]
    seen = {0: 0, 1: 0}
    held: set[int] = set()
    for row in rows:
        seen[row.label] += 1
        if seen[row.label] % 4 == 0:
            held.add(row.line)
    train = ROOT / ".local" / "demo-train.tsv"
    train.parent.mkdir(exist_ok=True)
    train.write_text("".join(f"{r.text}\t{r.label}\n" for r in rows if r.line not in held))
    return Plan("own-reviews", str(train), OWN_REVIEWS, held,
                f"the head was trained on the other {len(rows) - len(held)} of the project's {len(rows)} reviews")


def ensure_artifact(path: Path, train_data: str) -> None:
    if (path / "manifest.json").is_file():
        say(f"model artifact {path} is there")
        return
    pooling = "cls"
    if hub_reachable() or in_hub_cache(DEFAULT_ENCODER):
        say(f"training the head into {path}: {DEFAULT_ENCODER} [CLS] + logistic regression")
    else:
        pooling = "mean"
        say(f"training the head into {path}: the hub is unreachable, so the encoder will be the offline "
            f"{OFFLINE_HUB_NAME} with MEAN pooling (the pooling that sentence-transformers model is trained for; "
            f"{DEFAULT_ENCODER} would use [CLS]) + logistic regression")
    subprocess.run([sys.executable, "-m", "models", "train", "--data", train_data, "--out", str(path),
                    "--limit", "0", "--pooling", pooling], cwd=ROOT, check=True)


def honest(plan: Plan, artifact: Path) -> str | None:
    """Why no held-out score can be given (None when it can): the artifact must have been trained
    on this plan's training data, which its manifest records by sha256."""
    trained_on = read_manifest(artifact).get("data_sha256")
    if trained_on != sha256_file(resolve(plan.train_data)):
        return (f"{artifact} was trained on other data (sha256 {str(trained_on)[:12]}…), so these reviews "
                "may be among its training rows")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.demo", description=__doc__)
    parser.add_argument("--model", help="artifact folder (default: models/artifacts/sst2, or own-reviews "
                        "when SST-2 cannot be had)")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="stream only the first N reviews")
    parser.add_argument("--metrics-port", type=int, default=9108)
    args = parser.parse_args(argv)
    settings = KafkaSettings.from_env()
    plan = plan_reviews()
    model = Path(args.model or ROOT / "models" / "artifacts" / plan.name)
    ensure_artifact(model, plan.train_data)
    unscored = honest(plan, model)
    stream_file = plan.stream

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
    with WorkerProcess(model, topics, metrics_port=port, log=log) as worker:
        worker.wait_ready(timeout=300)
        say(f"streaming {len(rows)} reviews from {stream_file.name} + {len(MALFORMED)} malformed records")
        values = [encode_review(f"{run_id}-{r.line}", r.text, {
            "label": r.label, "held_out": not unscored and (plan.held_out is None or r.line in plan.held_out)})
            for r in rows]
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
    summarize(records, dead, inputs, seconds, port, scrape, unscored or plan.what, read_manifest(model))
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
              scrape: str, held_out: str, manifest: dict) -> None:
    results = [json.loads(r.value) for r in records]
    latencies = [b["classified_at"] - inputs[b["id"]] for b in results if b["id"] in inputs]
    labeled = [b for b in results if (b.get("meta") or {}).get("held_out")]
    correct = sum((b["label"] == "positive") == (b["meta"]["label"] == 1) for b in labeled)
    model = results[0]["model"] if results else "?"
    info = next((line for line in scrape.splitlines() if line.startswith("sentiment_worker_info{")), "")
    print("\n=== demo summary ===")
    print(f"model               {model}   {info[len('sentiment_worker_info'):].rsplit(' ', 1)[0]}")
    print(f"encoder             {manifest.get('encoder')}, {manifest.get('pooling')} pooling")
    print(f"records classified  {len(results)} in {seconds:.1f} s  ({len(results) / max(seconds, 1e-9):.1f}/s)")
    if latencies:
        print(f"latency p50 / p99   {np.percentile(latencies, 50) * 1000:.0f} ms / "
              f"{np.percentile(latencies, 99) * 1000:.0f} ms  (input timestamp to result)")
    if labeled:
        print(f"accuracy            {correct / len(labeled):.3f} on {len(labeled)} held-out reviews ({held_out})")
    else:
        print(f"accuracy            no held-out score ({held_out})")
    print(f"dead letters        {len(dead)}: " + ", ".join(sorted(d["error"] for d in dead)))
    print(f"metrics were served http://127.0.0.1:{port}/metrics")


if __name__ == "__main__":
    run(main)
