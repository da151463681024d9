"""`make soak MINUTES=N`: a steady stream at about 70 % of one worker's rate for N minutes with a
fault every minute (a worker SIGKILLed, one SIGTERMed, one joining, the broker restarted), under
one guarantee. Ends with one summary line, and exit 1 when anything was lost, duplicated under
exactly-once, held by an idle worker, when a worker did not stop on SIGTERM, or when the long-lived
worker's memory grew 5 % or more: its lowest resident size over the last minute of the stream against
its lowest over the minute after the second fault (each window holds one of the worker's once-a-minute
heap trims, so both read live memory, not what glibc had yet to give back). The first two faults are
the warm-up: the first takes the long-lived worker through its first rebalance and backlog catch-up,
and its live memory steps up there, within that minute (~55 MiB with the tiny model). A 20-minute run
showed one more step like it, near the fourteenth fault, and flat memory between (+9 %: it fails; what
holds that memory is not known yet; one 20-minute run with `--graph eager` did not step again: +0.4 %).
A run too short for both windows does not judge memory, and says so.

    python -m ops.soak --minutes 5 --guarantee exactly-once
    python -m ops.soak --minutes 6 --faults join,broker-restart --every 30   # one kind of fault, more often

For a worker found idle with records, or still running two minutes after SIGTERM, the worker log
gets every thread's stack (py-spy dump).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

from contract.kafka import KafkaSettings
from models.build import save_random_distilbert
from ops.harness import ROOT, Topics, WorkerProcess, free_port, publish, read
from worker.memory import TRIM_EVERY_S

OUT = ROOT / "ops" / "bench" / "out" / "soak"
FAULTS = ("sigkill", "sigterm", "join", "broker-restart")
IDLE_LIMIT_S = 60.0  # a broker restart may hold deliveries for tens of seconds
MEMORY_GROWTH_LIMIT = 0.05


def say(message: str) -> None:
    print(f"[soak] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def tiny_artifact() -> Path:
    """A tiny random DistilBERT and a head fitted on its features: the model costs almost nothing."""
    encoder, artifact = OUT / "tiny-encoder", OUT / "artifacts" / "tiny"
    texts = [f"{w} film number {i}" for i in range(200) for w in ("a fine", "a dull")]
    if not (encoder / "config.json").is_file():
        save_random_distilbert(encoder, texts, tiny=True, max_length=128)
    if not (artifact / "manifest.json").is_file():
        data = OUT / "train.tsv"
        data.write_text("".join(f"{t}\t{int('fine' in t)}\n" for t in texts))
        subprocess.run([sys.executable, "-m", "models", "train", "--data", str(data), "--encoder", str(encoder),
                        "--out", str(artifact), "--dtype", "fp32", "--test-size", "0.2"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    return artifact


def value(i: int) -> bytes:
    return json.dumps({"id": f"k{i}", "text": f"review {i}: " + "a fine film " * (i % 7 + 1)}).encode()


class Watch(threading.Thread):
    """Samples each worker's records in hand and delivered count every 2 s: a worker that holds records
    while delivering nothing for IDLE_LIMIT_S is idle with records."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.workers: list[WorkerProcess] = []
        self.idle: list[str] = []
        self.running = True

    def run(self) -> None:
        since: dict[int, tuple[float, float]] = {}
        while self.running:
            for w in list(self.workers):
                try:
                    held = w.metric("sentiment_worker_records_in_hand")
                    done = (w.metric("sentiment_worker_messages_classified_total")
                            + w.metric("sentiment_worker_messages_dead_lettered_total"))
                except OSError:
                    continue
                last_done, idle_from = since.get(w.proc.pid, (-1.0, time.monotonic()))
                if held == 0 or done != last_done:
                    idle_from = time.monotonic()
                elif time.monotonic() - idle_from > IDLE_LIMIT_S:
                    self.idle.append(f"pid {w.proc.pid} held {held:.0f} records for {IDLE_LIMIT_S:.0f} s")
                    w.dump_stacks()
                    idle_from = time.monotonic()
                since[w.proc.pid] = (done, idle_from)
            time.sleep(2)


class Resident(threading.Thread):
    """The long-lived worker's resident size every 2 s; `lowest(since, until)` over a window."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process, self.samples = psutil.Process(pid), []

    def run(self) -> None:
        while True:  # until the worker is gone
            try:
                self.samples.append((time.monotonic(), self.process.memory_info().rss))
            except psutil.Error:
                return
            time.sleep(2)

    def lowest(self, since: float, until: float) -> int | None:
        return min((rss for at, rss in self.samples if since <= at <= until), default=None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=float(os.environ.get("MINUTES", 5)))
    p.add_argument("--guarantee", default="at-least-once", choices=("at-least-once", "exactly-once"))
    p.add_argument("--rate", type=float, default=0.0, help="records/s (default: 70 %% of one worker's rate)")
    p.add_argument("--faults", default=",".join(FAULTS), help="the faults, in turn (default: %(default)s)")
    p.add_argument("--every", type=float, default=60.0, help="seconds between faults (default: 60)")
    args = p.parse_args(argv)
    faults = args.faults.split(",")
    if not set(faults) <= set(FAULTS):
        p.error(f"--faults: choose among {', '.join(FAULTS)}")
    broker_script = os.environ.get("KAFKA_LOCAL_BROKER")
    settings = KafkaSettings.from_env()
    OUT.mkdir(parents=True, exist_ok=True)
    artifact = tiny_artifact()
    wargs = ["--device", "cpu", "--guarantee", args.guarantee]
    logs = OUT / f"workers-{args.guarantee}.log"
    logs.write_text("")

    def worker(name: str, topics: Topics) -> WorkerProcess:
        return WorkerProcess(artifact, topics, *wargs, "--instance-id", name, env=dict(os.environ),
                             metrics_port=free_port(), log=logs)

    rate = args.rate
    if not rate:
        calibration = Topics.prefixed(settings, f"soak-cal-{int(time.time())}").create(partitions=4)
        publish(settings, calibration.input, [value(i) for i in range(6000)])
        with worker("calibrate", calibration) as w:
            w.wait_ready()
            started = time.monotonic()
            read(settings, calibration.output, 6000, timeout=300, committed_only=True)
            rate = 0.7 * 6000 / (time.monotonic() - started)
        calibration.delete()
    total = int(rate * args.minutes * 60)
    say(f"{args.guarantee}: {args.minutes:g} min at {rate:.0f} records/s ({total} records), "
        f"a fault every {args.every:g} s")
    topics = Topics.prefixed(settings, f"soak-{args.guarantee[:5]}-{int(time.time())}").create(partitions=4)
    watch = Watch()
    try:
        long_lived, other = worker("long-lived", topics), worker("replica-1", topics)
        watch.workers += [long_lived, other]
        long_lived.wait_ready()
        watch.start()
        stream = threading.Thread(target=publish, args=(settings, topics.input, [value(i) for i in range(total)]),
                                  kwargs={"rate": rate}, daemon=True)
        stream.start()
        resident = Resident(long_lived.proc.pid)
        resident.start()
        window = max(args.every, TRIM_EVERY_S)
        warm_at: float | None = None  # the second fault: memory is judged from here on
        time.sleep(min(60, args.minutes * 60 / 2))
        third: WorkerProcess | None = None
        stuck: list[str] = []  # workers that did not stop on SIGTERM

        def stop(w: WorkerProcess) -> None:
            try:
                code = w.terminate(timeout=120)
            except RuntimeError as err:
                stuck.append(str(err))
                return
            if code != 0:
                stuck.append(f"pid {w.proc.pid} exited {code} on SIGTERM: {w.tail()}")

        for n, fault in zip(range(int(args.minutes * 60 / args.every) - 1), faults * 1000, strict=False):
            say(f"fault {n + 1}: {fault}")
            warm_at = time.monotonic() if n == 1 else warm_at
            if fault == "sigkill":
                other.kill()
                other = worker("replica-1", topics)
            elif fault == "sigterm":
                stop(other)
                other = worker("replica-1", topics)
            elif fault == "join":
                if third is not None and third.alive():
                    stop(third)
                third = worker("replica-2", topics)
                watch.workers.append(third)
            elif broker_script:
                subprocess.run([broker_script, "stop"], check=True, stdout=subprocess.DEVNULL)
                time.sleep(5)
                subprocess.run([broker_script, "start"], check=True, stdout=subprocess.DEVNULL)
            watch.workers.append(other)
            time.sleep(args.every)
            if not long_lived.alive():
                say(f"the long-lived worker died (exit {long_lived.proc.returncode}): {long_lived.tail()}")
                return 1
        stream.join()
        stream_end = time.monotonic()
        before = resident.lowest(warm_at, warm_at + window) if warm_at else None
        after = resident.lowest(stream_end - window, stream_end)
        judged = before is not None and after is not None and warm_at + window <= stream_end - window
        (OUT / f"rss-{args.guarantee}.tsv").write_text("".join(f"{at - stream_end:.0f}\t{rss / 2**20:.0f}\n"
                                                               for at, rss in resident.samples))
        growth = (after - before) / before if judged else 0.0
        committed_only = args.guarantee == "exactly-once"
        results = read(settings, topics.output, total, timeout=600, committed_only=committed_only, settle=5,
                       progress="reading results")
        watch.running = False
        for w in (long_lived, other, third):
            if w is not None and w.alive():
                stop(w)
        got = Counter(json.loads(r.value)["id"] for r in results)
        lost = total - len(set(got) & {f"k{i}" for i in range(total)})
        duplicated = sum(got.values()) - len(got)
        say(f"worker log: {logs}; the long-lived worker's RSS (s before the stream's end, MiB): "
            f"{OUT / f'rss-{args.guarantee}.tsv'}")
        print(f"soak ({args.guarantee}, {args.minutes:g} min, {rate:.0f}/s): sent={total} classified={len(got)} "
              f"lost={lost} duplicated={duplicated} idle-with-records={len(watch.idle)} "
              + (f"long-lived RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB ({growth:+.1%}, lowest in the "
                 f"{window:.0f} s after the second fault and before the stream's end)" if judged else
                 "long-lived RSS not judged (the run is too short for two windows)"))
        for line in watch.idle:
            print(f"  idle: {line}")
        for line in stuck:
            print(f"  stuck: {line}")
        topics.delete()
        failed = lost or watch.idle or stuck or growth >= MEMORY_GROWTH_LIMIT or (committed_only and duplicated)
        return 1 if failed else 0
    finally:  # no worker outlives the soak, whatever ended it
        watch.running = False
        for w in watch.workers:
            w.__exit__()


if __name__ == "__main__":
    sys.exit(main())
