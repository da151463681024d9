"""`make bench`: ceiling (a), worker through Kafka (b), naive loop (c), latency under load (d), and the
pipeline reference point (e: each Kafka client's own loop against the tiny-model worker, ops/bench/pipeline.py).

Everything runs in one process tree on one machine, on the same sentences, with the
DistilBERT architecture and random weights (no hub needed). Writes ops/bench/results.json
and ops/bench/results.png, and prints the ratios (b)/(a) and (b)/(c).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from contract.kafka import KafkaSettings
from contract.records import encode_review
from contract.review_files import ReviewRow, read_reviews
from models.artifact import load_artifact
from models.classifier import Classifier
from models.encoder import Encoder
from ops.bench import pipeline
from ops.bench.ceiling import measure
from ops.bench.naive import run_naive
from ops.bench.random_model import OUT, ROOT, random_artifact
from ops.harness import Topics, WorkerProcess, free_port, publish, read

FALLBACK_REVIEWS = ROOT / "ops" / "demo_reviews.tsv"
WARMUP_S = 3.0  # offered load before latency is measured (first batches of each shape are slow)


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def sentences() -> tuple[list[str], Path]:
    folder = os.environ.get("SST2_DIR")
    path = Path(folder) / "dev.tsv" if folder and (Path(folder) / "dev.tsv").is_file() else FALLBACK_REVIEWS
    return [r.text for r in read_reviews(str(path)) if isinstance(r, ReviewRow)], path


def steady_rate(worker: WorkerProcess, count: int, timeout: float, what: str) -> float:
    """Records/s from the worker being ready (model loaded, partitions assigned) until its counter shows
    every result delivered. Reading the counter, not the output topic, keeps a reader off the CPU being
    measured; results of one partition leave in order, so they are delivered in bursts."""
    name = "sentiment_worker_messages_classified_total"
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    with tqdm(total=count, desc=what, unit="rec", file=sys.stderr) as bar:
        while time.monotonic() < deadline:
            done = worker.metric(name)
            bar.update(int(done) - bar.n)
            if done >= count:
                break
            time.sleep(0.1)
    return count / (time.perf_counter() - started)


def latency(records: list, sent_at: dict[str, float]) -> tuple[float, float]:
    """p50 and p99 from a review's timestamp to its result's (set when the worker sent it): results leave in each
    partition's offset order, so a record scored early may still wait for an earlier one (`classified_at` is when
    it was scored)."""
    lat = [r.timestamp / 1000 - sent_at[json.loads(r.value)["id"]] for r in records]
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench", description=__doc__)
    parser.add_argument("--backlog-seconds", type=float, default=15, help="size each backlog to about this long")
    parser.add_argument("--latency-seconds", type=float, default=12, help="measured, after a 3 s warm-up")
    parser.add_argument("--naive-records", type=int, default=200)
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--pipeline-records", type=int, default=20_000, help="backlog of the pipeline point (e)")
    args = parser.parse_args()
    texts, data = sentences()
    say(f"{len(texts)} sentences from {data}")
    artifact_dir = random_artifact("random-distilbert", texts, data)
    artifact = load_artifact(artifact_dir)
    results: dict = {"sentences": str(data), "ceiling": [], "worker": {}, "latency": []}

    say("(a) ceiling: bare encoder + head on pre-tokenized, length-sorted batches")
    ceilings = {}
    for dtype, quantize in (("fp32", "none"), ("auto", "none"), ("fp32", "int8")):
        classifier = Classifier.load(artifact, "cpu", dtype, quantize)
        classifier.encoder.trace()  # as the worker runs it
        for size in [int(s) for s in args.batch_sizes.split(",")]:
            if quantize == "int8" and size != 64:
                continue
            r = measure(classifier, texts, size)
            results["ceiling"].append({"dtype": r.dtype, "max_batch_size": size, "per_second": round(r.per_second, 1),
                                       "padding_efficiency": round(r.padding_efficiency, 3)})
            say(f"    {r.dtype:>5} batch {size:>3}: {r.per_second:7.1f} records/s")
            if size == 64:
                ceilings[r.dtype] = r.per_second
        del classifier

    settings = KafkaSettings.from_env()
    run_id = f"bench{int(time.time())}"

    def worker(name: str, dtype: str, backlog: list[str] | None = None) -> tuple[WorkerProcess, Topics]:
        topics = Topics.prefixed(settings, f"{run_id}.{name}").create()
        if backlog:
            publish(settings, topics.input, [encode_review(f"b{i}", t) for i, t in enumerate(backlog)])
        proc = WorkerProcess(artifact_dir, topics, "--dtype", dtype, "--device", "cpu", metrics_port=free_port(),
                             log=OUT / f"worker-{name}.log")
        return proc.wait_ready(), topics

    say("(b) worker end to end through Kafka on a backlog")
    for dtype in ("fp32", "auto"):
        name = Encoder.load(artifact.manifest.encoder, "cpu", dtype).dtype_name
        count = int(ceilings[name] * args.backlog_seconds)
        proc, _ = worker(f"worker-{name}", dtype, (texts * (count // len(texts) + 1))[:count])
        rate = steady_rate(proc, count, timeout=30 + 5 * args.backlog_seconds, what=f"worker {name}")
        padding = proc.metric("sentiment_worker_padding_efficiency")
        proc.terminate()
        results["worker"][name] = {"records": count, "per_second": round(rate, 1),
                                   "padding_efficiency": round(padding, 3),
                                   "ratio_to_ceiling": round(rate / ceilings[name], 3)}
        say(f"    {name}: {rate:.1f} records/s, padding efficiency {padding:.3f}, "
            f"{rate / ceilings[name]:.2f} x ceiling")

    say("(c) naive consumer: fp32, one record at a time, produce-and-wait, commit")
    naive_topics = Topics.prefixed(settings, f"{run_id}.naive").create()
    publish(settings, naive_topics.input,
            [encode_review(f"n{i}", t) for i, t in enumerate(texts[: args.naive_records])])
    encoder = Encoder.load(artifact.manifest.encoder, "cpu", "fp32")
    naive = run_naive(settings, encoder, artifact, naive_topics.input, naive_topics.output, args.naive_records)
    del encoder
    results["naive_per_second"] = round(naive, 1)
    say(f"    naive: {naive:.1f} records/s")

    best_name = max(results["worker"], key=lambda k: results["worker"][k]["per_second"])
    best = results["worker"][best_name]["per_second"]
    say(f"(d) latency at 25/50/75% of the worker's {best_name} rate ({best:.0f}/s)")
    for share in (0.25, 0.5, 0.75):
        proc, topics = worker(f"latency{int(share * 100)}", "fp32" if best_name == "fp32" else "auto")
        rate = best * share
        count = int(rate * (WARMUP_S + args.latency_seconds))
        offered = [encode_review(f"l{i}", texts[i % len(texts)]) for i in range(count)]
        publish(settings, topics.input, offered, rate=rate)
        records = read(settings, topics.output, count, timeout=60, progress=f"latency {share:.0%}")
        inputs = read(settings, topics.input, count, timeout=30)
        proc.terminate()
        measured_from = inputs[0].timestamp / 1000 + WARMUP_S
        sent_at = {json.loads(r.value)["id"]: r.timestamp / 1000 for r in inputs
                   if r.timestamp / 1000 >= measured_from}
        p50, p99 = latency([r for r in records if json.loads(r.value)["id"] in sent_at], sent_at)
        results["latency"].append({"offered_per_second": round(rate, 1), "p50_s": round(p50, 4),
                                   "p99_s": round(p99, 4)})
        say(f"    {rate:6.1f}/s offered: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")

    say("(e) pipeline: each client's own loop, the tiny-model worker with each client, tokenizing, forward")
    results["pipeline"] = pipeline.run(settings, args.pipeline_records, 4, pipeline.CLIENTS)

    ratio_a = results["worker"][best_name]["ratio_to_ceiling"]
    ratio_c = best / naive
    results["ratios"] = {"worker_over_ceiling": ratio_a, "worker_over_naive": round(ratio_c, 2),
                         "dtype": best_name}
    (ROOT / "ops" / "bench" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, ROOT / "ops" / "bench" / "results.png")
    print(f"(b)/(a) = {ratio_a:.2f}  (target >= 0.85)   (b)/(c) = {ratio_c:.1f}  (target >= 5)   "
          f"padding efficiency = {results['worker'][best_name]['padding_efficiency']:.3f}  (target >= 0.9)")
    print(pipeline.table(results["pipeline"]))
    print("wrote ops/bench/results.json and ops/bench/results.png")
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right, rates) = plt.subplots(1, 3, figsize=(16, 4.2))
    for dtype in sorted({c["dtype"] for c in results["ceiling"]}):
        rows = list({c["max_batch_size"]: c for c in results["ceiling"] if c["dtype"] == dtype}.values())  # one
        # line per dtype: "auto" resolves to fp32 on a CPU without native bf16, measured twice
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
    pipe = results["pipeline"]
    bars = [(f"{c} loop alone", v["per_second"]) for c, v in pipe["loop"].items()]
    bars += [(f"worker, tiny model, {c}", v["per_second"]) for c, v in pipe["worker"].items()]
    bars += [("worker, tiny model, Kafka in memory", pipe["memory_seam"]["per_second"])]
    bars += [("tokenizing alone", pipe["budget"]["tokenize_per_second"]),
             ("tiny forward alone", pipe["budget"]["forward_per_second"])]
    rates.barh([name for name, _ in bars], [rate for _, rate in bars], color="tab:blue")
    rates.set(xscale="log", xlabel="records / s", title="Pipeline: the worker's own path\n(tiny model)")
    rates.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
