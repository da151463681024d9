"""`make bench`: ceiling (a), worker through Kafka (b), naive loop (c), latency under load (d).

Everything runs in one process tree on one machine, on the same sentences, with the
DistilBERT architecture and random weights (no hub needed). Writes ops/bench/results.json
and ops/bench/results.png, and prints the ratios (b)/(a) and (b)/(c).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from tqdm import tqdm

from contract.kafka import KafkaSettings
from contract.records import encode_review
from contract.review_files import ReviewRow, read_reviews
from models.artifact import load_artifact
from models.build import save_random_distilbert
from models.encoder import Encoder, offline_folder
from models.head import TorchHead
from ops.bench.ceiling import measure
from ops.bench.naive import run_naive

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "ops" / "bench" / "out"
FALLBACK_REVIEWS = ROOT / "ops" / "demo_reviews.tsv"


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def sentences() -> tuple[list[str], Path]:
    folder = os.environ.get("SST2_DIR")
    path = Path(folder) / "dev.tsv" if folder and (Path(folder) / "dev.tsv").is_file() else FALLBACK_REVIEWS
    return [r.text for r in read_reviews(str(path)) if isinstance(r, ReviewRow)], path


def random_distilbert_artifact(data: Path, texts: list[str]) -> Path:
    """Random-weight DistilBERT (uncased vocab when the offline package has it) and a head fitted on its features."""
    encoder_dir, artifact = OUT / "random-distilbert", OUT / "artifacts" / "random-distilbert"
    if not (encoder_dir / "config.json").is_file():
        vocab = offline_folder() / "vocab.txt" if offline_folder() else None
        save_random_distilbert(encoder_dir, texts, vocab_file=vocab)
    if not (artifact / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "models", "train", "--data", str(data), "--encoder", str(encoder_dir),
                        "--out", str(artifact), "--limit", "300", "--dtype", "fp32"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    return artifact


class Kafka:
    def __init__(self) -> None:
        self.settings = KafkaSettings.from_env()
        self.run = f"bench{int(time.time())}"

    def topic(self, name: str, partitions: int = 1) -> str:
        full = f"{self.run}.{name}"
        admin = KafkaAdminClient(**self.settings.client_config("bench"))
        admin.create_topics([NewTopic(full, partitions, 1)])
        admin.close()
        return full

    def publish(self, topic: str, texts: list[str], rate: float = 0.0, seconds: float = 0.0) -> None:
        producer = KafkaProducer(**self.settings.client_config("bench"), acks="all", linger_ms=5)
        started, n = time.perf_counter(), 0
        while True:
            for text in texts:
                producer.send(topic, encode_review(f"b{n}", text))
                n += 1
                if rate:
                    delay = started + n / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    if time.perf_counter() - started >= seconds:
                        producer.flush()
                        producer.close()
                        return
            if not rate:
                producer.flush()
                producer.close()
                return

    def results(self, topic: str, count: int, timeout: float, what: str) -> list:
        consumer = KafkaConsumer(topic, **self.settings.client_config("bench"), auto_offset_reset="earliest")
        records: list = []
        deadline = time.monotonic() + timeout
        with tqdm(total=count, desc=what, unit="rec", file=sys.stderr) as bar:
            while len(records) < count and time.monotonic() < deadline:
                for batch in consumer.poll(timeout_ms=500).values():
                    records.extend(batch)
                    bar.update(len(batch))
        consumer.close()
        return records


class Worker:
    def __init__(self, artifact: Path, kafka: Kafka, name: str, *args: str, backlog: list[str] | None = None) -> None:
        self.topics = [kafka.topic(f"{name}.in"), kafka.topic(f"{name}.out"), kafka.topic(f"{name}.dlq")]
        if backlog:
            kafka.publish(self.topics[0], backlog)
        self.port = 9300 + os.getpid() % 500
        cmd = [sys.executable, "-m", "worker", "--model", str(artifact), "--input-topic", self.topics[0],
               "--output-topic", self.topics[1], "--dlq-topic", self.topics[2], "--group", f"{kafka.run}.{name}",
               "--metrics-port", str(self.port), "--metrics-host", "127.0.0.1", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
        self.wait_ready()

    def wait_ready(self) -> None:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit("the worker exited during start") from None
                time.sleep(0.2)
        raise SystemExit("the worker did not become ready")

    def metric(self, name: str) -> float:
        """The sum of a metric's series (e.g. classified over both labels)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return sum(float(line.rsplit(" ", 1)[1]) for line in r.read().decode().splitlines()
                       if line.startswith((name + " ", name + "{")))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def steady_rate(worker: Worker, count: int, timeout: float, what: str) -> float:
    """Records/s from the worker's own counter, between 10% and 100% of `count` (start-up and warm-up
    excluded). Reading the counter, not the output topic, keeps a reader off the CPU being measured."""
    name = "sentiment_worker_messages_classified_total"
    marks: list[tuple[float, float]] = []
    deadline = time.monotonic() + timeout
    with tqdm(total=count, desc=what, unit="rec", file=sys.stderr) as bar:
        while time.monotonic() < deadline:
            done = worker.metric(name)
            bar.update(int(done) - bar.n)
            marks.append((time.perf_counter(), done))
            if done >= count:
                break
            time.sleep(0.25)
    start = next((t, n) for t, n in marks if n >= 0.1 * count)
    end = marks[-1]
    return (end[1] - start[1]) / max(1e-3, end[0] - start[0])


def latency(records: list, sent_at: dict[str, float]) -> tuple[float, float]:
    lat = [json.loads(r.value)["classified_at"] - sent_at[json.loads(r.value)["id"]] for r in records]
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench", description=__doc__)
    parser.add_argument("--backlog-seconds", type=float, default=15, help="size each backlog to about this long")
    parser.add_argument("--latency-seconds", type=float, default=15)
    parser.add_argument("--naive-records", type=int, default=200)
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    args = parser.parse_args()
    texts, data = sentences()
    say(f"{len(texts)} sentences from {data}")
    artifact_dir = random_distilbert_artifact(data, texts)
    artifact = load_artifact(artifact_dir)
    results: dict = {"sentences": str(data), "ceiling": [], "worker": {}, "latency": []}

    say("(a) ceiling: bare encoder + head on pre-tokenized, length-sorted batches")
    ceilings = {}
    for dtype, quantize in (("fp32", "none"), ("auto", "none"), ("fp32", "int8")):
        encoder = Encoder.load(artifact.manifest.encoder, "cpu", dtype, quantize)
        head = TorchHead(artifact.estimator, encoder.device)
        for size in [int(s) for s in args.batch_sizes.split(",")]:
            if quantize == "int8" and size != 64:
                continue
            r = measure(encoder, head, texts, size)
            results["ceiling"].append({"dtype": r.dtype, "max_batch_size": size, "per_second": round(r.per_second, 1),
                                       "padding_efficiency": round(r.padding_efficiency, 3)})
            say(f"    {r.dtype:>5} batch {size:>3}: {r.per_second:7.1f} records/s")
            if size == 64:
                ceilings[r.dtype] = r.per_second
        del encoder, head

    kafka = Kafka()
    say("(b) worker end to end through Kafka on a backlog")
    for dtype in ("fp32", "auto"):
        probe = Encoder.load(artifact.manifest.encoder, "cpu", dtype)
        name = probe.dtype_name
        del probe
        count = int(ceilings[name] * args.backlog_seconds)
        worker = Worker(artifact_dir, kafka, f"worker-{name}", "--dtype", dtype, "--device", "cpu",
                        backlog=(texts * (count // len(texts) + 1))[:count])
        rate = steady_rate(worker, count, timeout=30 + 5 * args.backlog_seconds, what=f"worker {name}")
        padding = worker.metric("sentiment_worker_padding_efficiency")
        worker.stop()
        results["worker"][name] = {"records": count, "per_second": round(rate, 1),
                                   "padding_efficiency": round(padding, 3),
                                   "ratio_to_ceiling": round(rate / ceilings[name], 3)}
        say(f"    {name}: {rate:.1f} records/s, padding efficiency {padding:.3f}, "
            f"{rate / ceilings[name]:.2f} x ceiling")

    say("(c) naive consumer: fp32, one record at a time, produce-and-wait, commit")
    naive_in, naive_out = kafka.topic("naive.in"), kafka.topic("naive.out")
    kafka.publish(naive_in, texts[: args.naive_records])
    encoder = Encoder.load(artifact.manifest.encoder, "cpu", "fp32")
    naive = run_naive(kafka.settings, encoder, artifact, naive_in, naive_out, args.naive_records)
    del encoder
    results["naive_per_second"] = round(naive, 1)
    say(f"    naive: {naive:.1f} records/s")

    best_name = max(results["worker"], key=lambda k: results["worker"][k]["per_second"])
    best = results["worker"][best_name]["per_second"]
    say(f"(d) latency at 25/50/75% of the worker's {best_name} rate ({best:.0f}/s)")
    for share in (0.25, 0.5, 0.75):
        worker = Worker(artifact_dir, kafka, f"latency{int(share * 100)}", "--dtype",
                        "auto" if best_name != "fp32" else "fp32", "--device", "cpu")
        rate = best * share
        sent_at: dict[str, float] = {}
        producer = threading.Thread(target=kafka.publish, args=(worker.topics[0], texts, rate, args.latency_seconds))
        producer.start()
        producer.join()
        expected = int(rate * args.latency_seconds)
        records = kafka.results(worker.topics[1], expected, timeout=60, what=f"latency {share:.0%}")
        consumer = KafkaConsumer(worker.topics[0], **kafka.settings.client_config("bench"),
                                 auto_offset_reset="earliest")
        while len(sent_at) < len(records):
            for batch in consumer.poll(timeout_ms=500).values():
                sent_at.update({json.loads(r.value)["id"]: r.timestamp / 1000 for r in batch})
        consumer.close()
        worker.stop()
        p50, p99 = latency(records, sent_at)
        results["latency"].append({"offered_per_second": round(rate, 1), "p50_s": round(p50, 4),
                                   "p99_s": round(p99, 4)})
        say(f"    {rate:6.1f}/s offered: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")

    ratio_a = results["worker"][best_name]["ratio_to_ceiling"]
    ratio_c = best / naive
    results["ratios"] = {"worker_over_ceiling": ratio_a, "worker_over_naive": round(ratio_c, 2),
                         "dtype": best_name}
    (ROOT / "ops" / "bench" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, ROOT / "ops" / "bench" / "results.png")
    print(f"(b)/(a) = {ratio_a:.2f}  (target >= 0.85)   (b)/(c) = {ratio_c:.1f}  (target >= 5)   "
          f"padding efficiency = {results['worker'][best_name]['padding_efficiency']:.3f}  (target >= 0.9)")
    print("wrote ops/bench/results.json and ops/bench/results.png")
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for dtype in sorted({c["dtype"] for c in results["ceiling"]}):
        rows = [c for c in results["ceiling"] if c["dtype"] == dtype]
        left.plot([c["max_batch_size"] for c in rows], [c["per_second"] for c in rows], "o-",
                  label=f"ceiling {dtype}")
    for name, w in results["worker"].items():
        left.plot([64], [w["per_second"]], "s", markersize=9, label=f"worker {name} (Kafka)")
    left.axhline(results["naive_per_second"], color="grey", linestyle="--", label="naive loop")
    left.set(xscale="log", xlabel="max batch size", ylabel="records / s", title="Throughput (random DistilBERT)")
    left.legend(fontsize=8)
    lat = results["latency"]
    right.plot([x["offered_per_second"] for x in lat], [x["p50_s"] * 1000 for x in lat], "o-", label="p50")
    right.plot([x["offered_per_second"] for x in lat], [x["p99_s"] * 1000 for x in lat], "o-", label="p99")
    right.set(xlabel="offered load (records / s)", ylabel="end-to-end latency (ms)", title="Latency vs load")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
