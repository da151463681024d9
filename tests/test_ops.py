"""Operations files: Prometheus config and alert rules (promtool), the Grafana dashboard and the
alerts only use metrics the worker exports, and docker-compose.yml parses."""

import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT
from worker.metrics import WorkerMetrics

OPS = ROOT / "ops"
DESIGN_NAMES = ["messages_consumed_total", "messages_classified_total", "messages_dead_lettered_total",
                "batch_size", "batch_tokens", "inference_seconds", "end_to_end_latency_seconds",
                "throughput_messages_per_second", "consumer_lag", "padding_efficiency", "publish_errors_total",
                "rebalances_total", "info"]


def exported_names() -> set[str]:
    """Sample names the worker's registry exposes (counters with _total, histograms with their series)."""
    names = set()
    for family in WorkerMetrics().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + s for s in ("", "_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def used_names(text: str) -> set[str]:
    return set(re.findall(r"sentiment_worker_[a-z_]+", text))


def promtool() -> str:
    tool = shutil.which("promtool")
    if not tool:
        pytest.fail("promtool is missing: make test installs Debian's prometheus package (ops/install-tools)")
    return tool


def test_worker_exports_every_design_metric():
    assert {f"sentiment_worker_{n}" for n in DESIGN_NAMES} <= exported_names()


def test_prometheus_config_and_rules_pass_promtool():
    for args in (["check", "config", str(OPS / "prometheus" / "prometheus.yml")],
                 ["check", "rules", str(OPS / "prometheus" / "alerts.yml")]):
        result = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_cover_the_operating_cases():
    rules = yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {"SentimentWorkerDown", "SentimentConsumerLagGrowing",
                                          "SentimentDeadLetterRateHigh", "SentimentLatencyP99High",
                                          "SentimentStalled"}
    assert all(r["annotations"]["description"] for r in rules)


def test_dashboard_and_alerts_use_only_exported_metrics():
    dashboard = (OPS / "grafana" / "dashboards" / "sentiment.json").read_text()
    alerts = (OPS / "prometheus" / "alerts.yml").read_text()
    used = used_names(dashboard) | used_names(alerts)
    assert len(used) >= 10
    assert used <= exported_names(), used - exported_names()
    panels = json.loads(dashboard)["panels"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("throughput", "latency", "lag", "dead letters", "batch size", "batch tokens", "padding", "device"):
        assert topic in titles


def test_compose_file_parses_and_names_the_stack():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert {"kafka", "topics", "worker", "worker-cpu", "producer", "prometheus", "grafana"} <= set(compose["services"])
    gpu = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia"
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("no compose parser here (docker-compose); YAML structure checked only")
    result = subprocess.run([tool, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_kubernetes_manifests_probe_health_and_cap_replicas():
    docs = [d for f in sorted((OPS / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodMonitor", "ScaledObject"} <= kinds
    container = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")["spec"]
    assert scaled["triggers"][0]["type"] == "kafka" and scaled["maxReplicaCount"] >= 1
