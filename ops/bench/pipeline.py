"""The "pipeline" reference point (DESIGN.md, Benchmarks): what the worker's per-record path costs.

On one backlog (SST-2 sentences, 4 partitions), in one run on one machine:
- each Kafka client's own loop, no model: consume, produce each value, commit per poll;
- the worker with a tiny random DistilBERT (dim 32, 2 layers: the model costs almost nothing, as on
  a GPU) and GPU caps, once per `--kafka-client`;
- tokenizing alone and the tiny model's forward alone (length-sorted batches), the worker's budget;
- the same worker with Kafka replaced in memory (ops/bench/seam.py): no client can make it faster, so
  its rate bounds both clients' ratios here; the share of time its forward was busy says whether the
  model stage (slowed by sharing the cores and the GIL with the rest) is what holds it.

    python -m ops.bench.pipeline [--records 40000] [--out ops/bench/out/pipeline.json] [--profile]

`--profile` samples each worker with py-spy while it works (`make profile`): collapsed stacks per client in
ops/bench/out/profile-worker-*.txt and the main thread's top functions printed (share of its samples,
inclusive and own).

Prints a table and writes the figures as JSON. Needs a broker (KAFKA_BOOTSTRAP_SERVERS; `make bench`
starts the local one) and the `fast` extra for the confluent rows.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from contract.kafka import KafkaSettings
from contract.records import encode_review
from contract.review_files import ReviewRow, read_reviews
from models.classifier import BATCH_OVERHEAD_TOKENS, Classifier
from ops.bench import seam
from ops.bench.ceiling import measure
from ops.bench.random_model import OUT, ROOT, random_artifact
from ops.harness import Topics, WorkerProcess, free_port, publish

CLIENTS = ("kafka-python", "confluent")
# the tiny model stands for a model at GPU speed: GPU caps, and a batch's cost in tokens as on a GPU (a near-free
# forward, with the CPU's 64 the confluent worker ran 6,078/s against 7,110/s, 2 runs each, padding 0.99 vs 0.92)
GPU_ROWS, GPU_TOKENS = 256, 65536
GPU_CAPS = ("--max-batch-size", str(GPU_ROWS), "--max-batch-tokens", str(GPU_TOKENS),
            "--batch-overhead-tokens", str(BATCH_OVERHEAD_TOKENS["cuda"]))
POLL_RECORDS = 500


def say(message: str) -> None:
    print(f"[pipeline] {message}", file=sys.stderr, flush=True)


def review_files() -> list[Path]:
    """SST-2 (train, dev) where SST2_DIR has it, else the demo reviews."""
    folder = os.environ.get("SST2_DIR")
    paths = [Path(folder) / f"{split}.tsv" for split in ("train", "dev")] if folder else []
    return [p for p in paths if p.is_file()] or [ROOT / "ops" / "demo_reviews.tsv"]


def sentences(count: int) -> list[str]:
    """`count` sentences, repeated as needed."""
    texts = [r.text for path in review_files() for r in read_reviews(str(path)) if isinstance(r, ReviewRow)]
    return (texts * (count // len(texts) + 1))[:count]


# -- each client's own loop ----------------------------------------------------------------------------


def kafka_python_loop(settings: KafkaSettings, topics: Topics, count: int) -> float:
    from kafka import KafkaConsumer, KafkaProducer

    from worker.kafka_python import producer_throughput  # the worker's, so the ratio is the worker's own path
    consumer = KafkaConsumer(topics.input, **settings.client_config("bench-loop"), group_id=topics.group,
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             isolation_level="read_committed", max_poll_records=POLL_RECORDS)
    producer = KafkaProducer(**settings.client_config("bench-loop"), **producer_throughput())
    done, started = 0, None
    while done < count:
        polled = consumer.poll(timeout_ms=100)
        for records in polled.values():
            for record in records:
                producer.send(topics.output, key=record.key, value=record.value)
            done += len(records)
        if polled:
            started = started or time.perf_counter()
            consumer.commit_async()
    producer.flush()
    elapsed = time.perf_counter() - started
    consumer.close()
    producer.close()
    return count / elapsed


def confluent_loop(settings: KafkaSettings, topics: Topics, count: int) -> float:
    from confluent_kafka import Consumer, Producer

    base = settings.librdkafka_config("bench-loop")
    consumer = Consumer({**base, "group.id": topics.group, "auto.offset.reset": "earliest",
                         "enable.auto.commit": False, "isolation.level": "read_committed"})
    producer = Producer({**base, "acks": "all", "linger.ms": 2, "enable.idempotence": True})
    consumer.subscribe([topics.input])
    done, started = 0, None
    while done < count:
        messages = consumer.consume(POLL_RECORDS, 0.1)
        for message in messages:
            if message.error() is None:
                producer.produce(topics.output, message.value(), message.key())
                done += 1
        if messages:
            started = started or time.perf_counter()
            producer.poll(0)
            consumer.commit(asynchronous=True)
    producer.flush()
    elapsed = time.perf_counter() - started
    consumer.close()
    return count / elapsed


# -- the worker, tiny model ----------------------------------------------------------------------------


def worker_rate(artifact: Path, topics: Topics, client: str, count: int, timeout: float, profile: bool) -> dict:
    """Records/s from ready (model loaded, group joined) until the counters show every record delivered."""
    env = dict(os.environ, SENTIMENT_KAFKA_CLIENT=client)
    with WorkerProcess(artifact, topics, "--device", "cpu", "--dtype", "fp32", *GPU_CAPS, env=env,
                       metrics_port=free_port(), log=OUT / f"pipeline-worker-{client}.log") as worker:
        worker.wait_ready()
        spy = Profile(worker.proc.pid, OUT / f"profile-worker-{client}") if profile else None
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        done = 0.0
        while time.monotonic() < deadline and done < count:
            time.sleep(0.2)
            done = (worker.metric("sentiment_worker_messages_classified_total")
                    + worker.metric("sentiment_worker_messages_dead_lettered_total"))
        elapsed = time.perf_counter() - started
        padding = worker.metric("sentiment_worker_padding_efficiency")
        top = spy.stop() if spy else None
        worker.terminate()
    if done < count:
        raise RuntimeError(f"the {client} worker delivered {done:.0f} of {count} in {timeout:.0f} s")
    return {"per_second": round(count / elapsed, 1), "padding_efficiency": round(padding, 3)} | (
        {"profile_top": top} if top else {})


class Profile:
    """py-spy recording a process until `stop`, as collapsed stacks (speedscope.app or flamegraph.pl draw them)."""

    def __init__(self, pid: int, stem: Path) -> None:
        self.raw = stem.with_suffix(".txt")
        spy = Path(sys.executable).with_name("py-spy")
        self.proc = subprocess.Popen([str(spy), "record", "--pid", str(pid), "--format", "raw", "--threads",
                                      "--nolineno", "--nonblocking", "--rate", "200", "-o", str(self.raw)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self, rows: int = 15) -> list[tuple[str, float, float]]:
        """The main thread's top functions: (function, inclusive share, own share) of its samples."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)
        inclusive: dict[str, int] = {}
        own: dict[str, int] = {}
        total = 0
        for line in self.raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            if "MainThread" not in frames[0]:
                continue
            total += int(count)
            for frame in set(frames[1:]):
                inclusive[frame] = inclusive.get(frame, 0) + int(count)
            own[frames[-1]] = own.get(frames[-1], 0) + int(count)
        top = sorted(inclusive, key=inclusive.get, reverse=True)[:rows]
        return [(name, round(inclusive[name] / max(1, total), 3), round(own.get(name, 0) / max(1, total), 3))
                for name in top]


# -- tokenizing and forward alone ----------------------------------------------------------------------


def tiny_classifier(artifact: Path) -> Classifier:
    """The tiny model as the worker runs it: traced, batches cut as the worker is told to (GPU_CAPS)."""
    classifier = Classifier.load(artifact, "cpu", "fp32")
    classifier.encoder.trace()
    classifier.batch_overhead_tokens = BATCH_OVERHEAD_TOKENS["cuda"]
    return classifier


def budget(classifier: Classifier, texts: list[str]) -> dict:
    sample = texts[:10_000]
    started = time.perf_counter()
    for i in range(0, len(sample), 256):
        classifier.encoder.tokenize(sample[i:i + 256])
    tokenize = len(sample) / (time.perf_counter() - started)
    with torch.inference_mode():
        forward = measure(classifier, sample, GPU_ROWS, GPU_TOKENS).per_second
    return {"tokenize_per_second": round(tokenize, 1), "forward_per_second": round(forward, 1)}


def run(settings: KafkaSettings, count: int, partitions: int, clients: tuple[str, ...], profile: bool = False) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    texts = sentences(count)
    artifact = random_artifact("tiny-distilbert", texts[:5000], review_files()[-1], tiny=True)
    run_id = f"pipeline{int(time.time())}"
    source = Topics.prefixed(settings, f"{run_id}.in").create(partitions)
    say(f"publishing {count} records on {partitions} partitions")
    publish(settings, source.input, [encode_review(f"p{i}", t) for i, t in enumerate(texts)])
    results: dict = {"records": count, "partitions": partitions, "cpus": os.cpu_count(),
                     "load_average": os.getloadavg(), "loop": {}, "worker": {}}

    def topics_for(name: str) -> Topics:
        """The shared input (deleted once, at the end); this run's own output, dead letters and group."""
        own = replace(Topics.prefixed(settings, f"{run_id}.{name}"), input=source.input).create()
        own.created.remove(source.input)
        return own

    loops = {"kafka-python": kafka_python_loop, "confluent": confluent_loop}
    for client in clients:
        say(f"{client} loop alone")
        topics = topics_for(f"loop-{client}")
        results["loop"][client] = {"per_second": round(loops[client](settings, topics, count), 1)}
        topics.delete()
    for client in clients:
        say(f"worker, tiny model, {client}")
        topics = topics_for(f"worker-{client}")
        results["worker"][client] = worker_rate(artifact, topics, client, count, count / 100 + 120, profile)
        topics.delete()
    say("tokenizing and the tiny forward alone; the worker with Kafka in memory")
    classifier = tiny_classifier(artifact)
    results["budget"] = budget(classifier, texts)
    # the same worker loop with Kafka in memory, over 10-90 % of the backlog: no client library, no broker, no
    # start-up, so an upper bound for either client on this machine
    memory = seam.worker_rate(classifier, texts, GPU_ROWS, GPU_TOKENS, len(texts))
    results["memory_seam"] = {"per_second": round(memory.per_second, 1), "forward_busy": round(memory.forward_busy, 3)}
    source.delete()
    return results


def table(results: dict) -> str:
    loop, worker, budget_ = results["loop"], results["worker"], results["budget"]
    rows = [(f"{c} alone: consume, produce each value, commit per poll (no model)", loop[c]["per_second"])
            for c in loop]
    rows += [(f"the worker, tiny model, --kafka-client {c}", worker[c]["per_second"]) for c in worker]
    memory = results["memory_seam"]["per_second"]
    rows += [("the worker, tiny model, Kafka in memory (no client, no broker: ops/bench/seam.py)", memory),
             ("tokenizing alone (batches of 256)", budget_["tokenize_per_second"]),
             ("tiny model forward alone (length-sorted, 256 rows)", budget_["forward_per_second"])]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'path':<{width}} | records/s", f"{'-' * width}-|----------"]
    lines += [f"{name:<{width}} | {rate:>9,.0f}" for name, rate in rows]
    slower = min(budget_["tokenize_per_second"], budget_["forward_per_second"])
    if "kafka-python" in worker and "kafka-python" in loop:
        ratio = worker["kafka-python"]["per_second"] / loop["kafka-python"]["per_second"]
        lines.append(f"worker kafka-python / kafka-python loop = {ratio:.2f} (target >= 0.4, goal 0.6)")
    if "confluent" in worker and "kafka-python" in worker:
        lines.append(f"worker confluent / worker kafka-python = "
                     f"{worker['confluent']['per_second'] / worker['kafka-python']['per_second']:.2f} (target >= 1.5)"
                     f"; / slower of tokenizing and forward = {worker['confluent']['per_second'] / slower:.2f} "
                     "(or >= 0.8)")
    if "kafka-python" in worker and "kafka-python" in loop:
        lines.append(f"the worker with Kafka in memory, the bound of each ratio on this machine: "
                     f"/ kafka-python loop = {memory / loop['kafka-python']['per_second']:.2f}, "
                     f"/ worker kafka-python = {memory / worker['kafka-python']['per_second']:.2f}, "
                     f"/ slower of tokenizing and forward = {memory / slower:.2f}")
    busy = results["memory_seam"]["forward_busy"]
    lines.append(f"with Kafka in memory the tiny forward was busy {busy:.0%} of the time: "
                 f"{busy / memory * 1e6:.0f} us a record there, {1e6 / budget_['forward_per_second']:.0f} alone")
    for client, figures in worker.items():
        if figures.get("profile_top"):
            lines.append(f"\nworker main thread, --kafka-client {client}: share of samples (inclusive, own)")
            lines += [f"  {inc:6.1%} {own:6.1%}  {name}" for name, inc, own in figures["profile_top"]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=40_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--out", type=Path, default=OUT / "pipeline.json")
    parser.add_argument("--profile", action="store_true", help="sample each worker with py-spy")
    args = parser.parse_args()
    results = run(KafkaSettings.from_env(), args.records, args.partitions, tuple(args.clients.split(",")),
                  args.profile)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
