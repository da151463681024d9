"""Prometheus metrics (names from DESIGN.md), /healthz and /readyz, and consumer lag.

Lag is read off the hot path by its own thread, with its own clients: the broker's end
offsets minus the group's committed offsets, for the partitions this worker owns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from contract.kafka import KafkaSettings

log = logging.getLogger(__name__)

PREFIX = "sentiment_worker_"
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
# a batch of the tiny or a GPU model takes about a millisecond: buckets start well below
INFERENCE_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
WINDOW_S = 10.0
REFUSING_S = 60.0  # /readyz turns 503 after the output refused writes this long

disable_created_metrics()  # one series per metric: dashboards need no *_created


class WorkerMetrics:
    """Every metric of the worker, in its own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_* (memory, CPU, open files): a custom registry has none by default
        self.consumed = Counter(PREFIX + "messages_consumed", "Records polled from the input topic", registry=r)
        self.classified = Counter(PREFIX + "messages_classified", "Results delivered", ["label"], registry=r)
        self.dead_lettered = Counter(PREFIX + "messages_dead_lettered", "Dead letters delivered", ["reason"],
                                     registry=r)
        self.truncated = Counter(PREFIX + "messages_truncated", "Reviews cut at the model's token limit",
                                 registry=r)
        self.batch_size = Histogram(PREFIX + "batch_size", "Records per batch", buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram(PREFIX + "batch_tokens", "Padded tokens per batch (rows x longest row)",
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.inference = Histogram(PREFIX + "inference_seconds", "Encoder + head time per batch",
                                   buckets=INFERENCE_BUCKETS, registry=r)
        self.latency = BulkHistogram(PREFIX + "end_to_end_latency_seconds",
                                     "Input record timestamp to result acknowledged", SECONDS_BUCKETS, r)
        self.throughput = Gauge(PREFIX + "throughput_messages_per_second",
                                f"Records delivered per second over the last {WINDOW_S:.0f} s", registry=r)
        self.lag = Gauge(PREFIX + "consumer_lag", "End offset minus the group's committed offset",
                         ["topic", "partition"], registry=r)
        self.padding = Gauge(PREFIX + "padding_efficiency", "Real / padded tokens over recent batches", registry=r)
        self.publish_errors = Counter(PREFIX + "publish_errors", "Failed publishes or transactions", registry=r)
        self.in_hand = Gauge(PREFIX + "records_in_hand", "Records between poll and commit", registry=r)
        self.rebalances = Counter(PREFIX + "rebalances", "Partition assignments received", registry=r)
        self.info = Gauge(PREFIX + "info", "Model and placement of this worker",
                          ["model", "device", "dtype", "guarantee"], registry=r)
        self._window: deque[list] = deque()  # [second, count] per second with deliveries
        self._window_sum = 0
        self._tokens: deque[tuple[int, int]] = deque(maxlen=50)

    def observe_batch(self, rows: int, real_tokens: int, padded_tokens: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.batch_tokens.observe(padded_tokens)
        self.inference.observe(seconds)
        self._tokens.append((real_tokens, padded_tokens))
        self.padding.set(sum(t[0] for t in self._tokens) / max(1, sum(t[1] for t in self._tokens)))

    def delivered(self, count: int = 1) -> None:
        """O(1) per message: counts go into one-second buckets, the gauge is set by refresh_throughput."""
        second = int(time.monotonic())
        if self._window and self._window[-1][0] == second:
            self._window[-1][1] += count
        else:
            self._window.append([second, count])
        self._window_sum += count

    def refresh_throughput(self) -> None:
        now = time.monotonic()
        while self._window and now - self._window[0][0] > WINDOW_S:
            self._window_sum -= self._window.popleft()[1]
        span = max(1.0, now - self._window[0][0]) if self._window else WINDOW_S
        self.throughput.set(self._window_sum / min(WINDOW_S, span))


class BulkHistogram:
    """A Prometheus histogram observed many values at a time. The end-to-end latency has a value for every
    result: one `Histogram.observe` each (a lock and a scan of the buckets) was a tenth of the loop's
    per-record cost at GPU speed; this is one numpy call per step."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = np.array([*buckets, np.inf])
        self._counts = np.zeros(len(self.bounds), dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()  # the loop observes, the HTTP thread collects
        registry.register(self)

    def observe(self, values: np.ndarray) -> None:
        """Add `values`; each falls in the first bucket whose bound is >= it (Prometheus' `le`)."""
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(self.bounds))
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def collect(self) -> list[HistogramMetricFamily]:
        with self._lock:
            cumulative, total = np.cumsum(self._counts).tolist(), self._sum
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], [(floatToGoString(b), c) for b, c in zip(self.bounds.tolist(), cumulative, strict=True)],
                          total)
        return [family]


class Health:
    """What /healthz (the loop is alive), /startupz (the model is loaded) and /readyz (loaded, in the
    group, zero partitions allowed, and the output accepts writes) answer."""

    def __init__(self) -> None:
        self.last_tick = time.monotonic()
        self.model_loaded = False
        self.joined = False
        self.assigned: frozenset = frozenset()  # the partitions this worker owns, for the lag monitor
        self.refusing_since: float | None = None

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last_tick < 30

    def ready(self) -> bool:
        refusing = self.refusing_since is not None and time.monotonic() - self.refusing_since > REFUSING_S
        return self.model_loaded and self.joined and self.alive() and not refusing


def serve(metrics: WorkerMetrics, health: Health, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?")[0]
            if path == "/metrics":
                body, status, ctype = generate_latest(metrics.registry), 200, CONTENT_TYPE_LATEST
            elif path in ("/healthz", "/readyz", "/startupz"):
                checks = {"/healthz": health.alive, "/readyz": health.ready, "/startupz": lambda: health.model_loaded}
                ok = checks[path]()
                body, status, ctype = (b"ok\n" if ok else b"not ready\n"), 200 if ok else 503, "text/plain"
            else:
                body, status, ctype = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


class LagMonitor:
    """Refreshes consumer_lag{topic,partition} every `interval_s` for the partitions this worker owns."""

    def __init__(self, settings: KafkaSettings, group: str, metrics: WorkerMetrics, health: Health,
                 interval_s: float = 5.0) -> None:
        self.settings, self.group, self.metrics, self.health = settings, group, metrics, health
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lag", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        admin = consumer = None
        shown: set[TopicPartition] = set()
        while not self._stop.wait(self.interval_s):
            try:
                if admin is None:
                    admin = KafkaAdminClient(**self.settings.client_config("sentiment-worker-lag"))
                    consumer = KafkaConsumer(**self.settings.client_config("sentiment-worker-lag"))
                owned = {TopicPartition(*tp) for tp in self.health.assigned}
                if owned:
                    ends = consumer.end_offsets(list(owned))
                    committed = admin.list_group_offsets({self.group: list(owned)}).get(self.group, {})
                    for tp in owned:
                        done = committed.get(tp)
                        position = done.offset if done is not None and done.offset >= 0 else 0
                        self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, ends[tp] - position))
                for tp in shown - owned:
                    self.metrics.lag.remove(tp.topic, str(tp.partition))
                shown = owned
            except Exception as err:  # the broker may be away for a while; lag is best effort
                log.debug("lag refresh failed: %s", err)
        for client in (admin, consumer):
            if client is not None:
                client.close()

    def stop(self) -> None:
        self._stop.set()
