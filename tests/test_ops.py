"""Operations files, checked field by field: Prometheus config and alert rules (promtool, and the rules'
own unit tests), the Grafana dashboard and provisioning, docker-compose.yml as compose resolves it, the
Dockerfile, and the Kubernetes manifests. make stack-test runs the compose stack itself."""

import json
import os
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
JOB = "sentiment-worker"
ALL_PROFILES = ["gpu", "gpu1", "gpu2", "gpu3", "cpu", "grafana"]
APP_SERVICES = {"train", "worker", "worker-gpu1", "worker-gpu2", "worker-gpu3", "worker-cpu", "producer"}
WORKERS = {"worker", "worker-gpu1", "worker-gpu2", "worker-gpu3", "worker-cpu"}


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
    return set(re.findall(r"\b(?:sentiment_worker|process)_[a-z_]+", text))


def promtool() -> str:
    tool = shutil.which("promtool")
    if not tool:
        pytest.fail("promtool is missing: make test installs Debian's prometheus package (ops/install-tools)")
    return tool


def alert_rules() -> list[dict]:
    return yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]


def test_worker_exports_every_design_metric_and_its_process_metrics():
    names = exported_names()
    assert {f"sentiment_worker_{n}" for n in DESIGN_NAMES} <= names
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"} <= names


def test_prometheus_config_and_rules_pass_promtool():
    for args in (["check", "config", str(OPS / "prometheus" / "prometheus.yml")],
                 ["check", "rules", str(OPS / "prometheus" / "alerts.yml")]):
        result = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_unit_tests():
    """alerts.test.yml: who fires, with which labels, for down/absent workers, lag with and without its
    floor, producer vs worker-side dead letters, one stalled worker among others, p99 latency."""
    result = subprocess.run([promtool(), "test", "rules", "alerts.test.yml"], capture_output=True, text=True,
                            timeout=120, cwd=OPS / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {t["alertname"] for case in yaml.safe_load((OPS / "prometheus" / "alerts.test.yml").read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert tested == {r["alert"] for r in alert_rules()}


def test_alert_rules_cover_the_operating_cases_for_the_scraped_job():
    rules = alert_rules()
    assert {r["alert"] for r in rules} == {"SentimentWorkerDown", "SentimentNoWorkers", "SentimentConsumerLagGrowing",
                                          "SentimentDeadLetterRateHigh", "SentimentWorkerDeadLetters",
                                          "SentimentLatencyP99High", "SentimentStalled"}
    assert all(r["annotations"]["description"] and r["labels"]["severity"] in ("warning", "critical") for r in rules)
    jobs = {j for r in rules for j in re.findall(r'job="([^"]+)"', r["expr"])}
    scrape = yaml.safe_load((OPS / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    assert jobs == {JOB} == {s["job_name"] for s in scrape}
    assert "absent(" in next(r for r in rules if r["alert"] == "SentimentNoWorkers")["expr"]


def test_dashboard_and_alerts_use_only_exported_metrics():
    dashboard = (OPS / "grafana" / "dashboards" / "sentiment.json").read_text()
    alerts = (OPS / "prometheus" / "alerts.yml").read_text()
    used = used_names(dashboard) | used_names(alerts)
    assert len(used) >= 12
    assert used <= exported_names(), used - exported_names()
    panels = json.loads(dashboard)["panels"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("throughput", "latency", "lag", "dead letters", "batch size", "batch tokens", "padding", "device",
                  "memory"):
        assert topic in titles


def test_dashboard_takes_its_datasource_and_workers_as_variables():
    dashboard = json.loads((OPS / "grafana" / "dashboards" / "sentiment.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["includeAll"] and "sentiment_worker_" in variables["instance"]["definition"]
    for panel in dashboard["panels"]:
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert 'instance=~"$instance"' in expr, expr
            for window in re.findall(r"\brate\([^\[]*\[([^\]]+)\]", expr):
                assert window == "$__rate_interval", expr


def test_grafana_provisioning_matches_the_compose_mounts():
    provisioning = OPS / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    provider = yaml.safe_load((provisioning / "dashboards" / "sentiment.yml").read_text())["providers"][0]
    grafana = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./ops/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./ops/grafana/dashboards"] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/sentiment.json"
    assert grafana["profiles"] == ["grafana"]  # no Debian package: make stack-test leaves it out


# -- docker compose, as compose itself resolves the file -------------------------------------------


def compose_config(**env: str) -> dict:
    """`docker compose config` (the plugin), else `docker-compose config` (v1): every profile, only `env`."""
    plugin = shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                       timeout=30).returncode == 0
    command = ["docker", "compose"] if plugin else ["docker-compose"] if shutil.which("docker-compose") else None
    if command is None:
        pytest.skip("no compose here (make test installs Debian's docker-compose)")
    profiles = [arg for p in ALL_PROFILES for arg in ("--profile", p)]
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    result = subprocess.run([*command, "-f", str(ROOT / "docker-compose.yml"), *profiles, "config"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT, env=clean)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def published(service: dict) -> list[tuple[str, str, int]]:
    """(host address, host port, container port) of each published port, from v1's or v2's output."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip", ""), str(port["published"]), int(port["target"])))
        else:
            host, published_port, target = str(port).split("/")[0].rsplit(":", 2)
            out.append((host, published_port, int(target)))
    return out


def test_compose_defaults_are_the_upstream_images_on_the_usual_local_ports():
    services = compose_config()
    assert {"kafka", "topics", "train", "producer", "prometheus", "grafana"} | WORKERS == set(services)
    assert services["kafka"]["image"] == services["topics"]["image"] == "apache/kafka:4.1.1"
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    assert services["worker"]["build"]["args"]["BASE_IMAGE"] == "python:3.11-slim"
    assert published(services["kafka"]) == [("127.0.0.1", "9092", 19092)]
    assert published(services["prometheus"]) == [("127.0.0.1", "9090", 9090)]
    assert published(services["grafana"]) == [("127.0.0.1", "3000", 3000)]
    assert "HOST://localhost:9092" in services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]


def test_compose_takes_images_and_host_ports_from_variables():
    services = compose_config(KAFKA_IMAGE="k:1", PROMETHEUS_IMAGE="p:1", GRAFANA_IMAGE="g:1", BASE_IMAGE="b:1",
                              SENTIMENT_IMAGE="s:1", KAFKA_HOST_PORT="49092", PROMETHEUS_PORT="49090",
                              GRAFANA_PORT="43000", BIND_ADDRESS="0.0.0.0", KAFKA_HOST_NAME="stack.example")
    assert services["kafka"]["image"] == services["topics"]["image"] == "k:1"
    assert (services["prometheus"]["image"], services["grafana"]["image"]) == ("p:1", "g:1")
    assert {services[s]["image"] for s in APP_SERVICES} == {"s:1"}
    assert services["train"]["build"]["args"]["BASE_IMAGE"] == "b:1"
    assert published(services["kafka"]) == [("0.0.0.0", "49092", 19092)]
    assert published(services["prometheus"]) == [("0.0.0.0", "49090", 9090)]
    assert published(services["grafana"]) == [("0.0.0.0", "43000", 3000)]
    kafka = services["kafka"]["environment"]
    listeners = dict(item.split("://") for item in kafka["KAFKA_LISTENERS"].split(","))
    advertised = dict(item.split("://") for item in kafka["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert advertised == {"PLAINTEXT": "kafka:9092", "HOST": "stack.example:49092"}
    assert listeners["HOST"] == ":19092"  # the port published above
    assert "HOST:PLAINTEXT" in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]


def test_compose_gives_each_gpu_worker_its_own_gpu():
    services = compose_config()
    gpus = []
    for name in sorted(WORKERS - {"worker-cpu"}):
        service = services[name]
        assert "replicas" not in service.get("deploy", {}), name
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "count" not in device and device["capabilities"] == ["gpu"]
        gpus += device["device_ids"]
        assert service["environment"]["SENTIMENT_DEVICE"] == "cuda"
        assert service["environment"]["SENTIMENT_KAFKA_CLIENT"] == "confluent"  # GPU speed needs librdkafka
    assert gpus == ["0", "1", "2", "3"]
    assert "deploy" not in services["worker-cpu"] and services["worker-cpu"]["environment"]["SENTIMENT_DEVICE"] == "cpu"


def test_compose_mounts_are_writable_for_the_app_user_and_inputs_come_from_the_host():
    services = compose_config(ARTIFACTS_DIR="/srv/artifacts", INPUT_DIR="/srv/input", REVIEWS_FILE="mine.jsonl",
                              SST2_DIR="/srv/sst2")

    def mounts(name: str) -> dict[str, str]:
        found = {}
        for volume in services[name].get("volumes", []):
            if isinstance(volume, dict):
                found[volume["target"]] = volume["source"]
            else:
                source, target = volume.split(":")[:2]
                found[target] = source
        return found

    for name in APP_SERVICES:
        # root only until the entrypoint has handed the mounts to uid 10001 (ops/docker/entrypoint)
        assert services[name]["user"] == "0:0", name
    for name in WORKERS | {"train"}:
        assert mounts(name)["/app/models/artifacts"] == "/srv/artifacts"
        assert mounts(name)["/home/app/.cache"].endswith("hf-cache")
    assert mounts("train")["/data/sst2"] == "/srv/sst2"
    assert mounts("producer") == {"/input": "/srv/input"}
    assert "/input/mine.jsonl" in services["producer"]["command"]
    for name in WORKERS:  # a health check only where a metrics port answers it
        assert "9108/healthz" in " ".join(services[name]["healthcheck"]["test"])
        assert "9108" in services[name]["command"]
    for name in ("train", "producer", "topics"):
        assert "healthcheck" not in services[name], name


def test_the_entrypoint_hands_the_mounted_folders_to_the_app_user():
    entrypoint = (OPS / "docker" / "entrypoint").read_text()
    for folder in ("/app/models/artifacts", "/home/app/.cache"):
        assert folder in entrypoint
    assert "chown app:app" in entrypoint and "setpriv --reuid=app" in entrypoint


# -- the image ---------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (OPS / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split()[0], line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.startswith("#")]


def test_dockerfile_installs_dependencies_before_the_sources():
    steps = dockerfile_instructions()
    kinds = [kind for kind, _ in steps]
    assert steps[0] == ("ARG", "BASE_IMAGE=python:3.11-slim") and steps[1] == ("FROM", "${BASE_IMAGE}")
    install = next(i for i, (kind, arg) in enumerate(steps) if kind == "RUN" and "pip install" in arg)
    copies = [(i, arg) for i, (kind, arg) in enumerate(steps) if kind == "COPY"]
    assert [arg for i, arg in copies if i < install] == ["pyproject.toml ./"]
    assert {arg.split()[0] for i, arg in copies if i > install} >= {"contract", "models", "producer", "worker"}
    assert "HEALTHCHECK" not in kinds  # only the worker has a port to check: compose checks it there
    assert ("USER", "app") in steps and ("ARG", "PIP_CERT") in steps
    assert not any(kind == "ENV" and "PIP_CERT" in arg for kind, arg in steps)  # not kept in the image
    env = " ".join(arg for kind, arg in steps if kind == "ENV")
    assert "HF_HOME=/home/app/.cache/huggingface" in env


def test_dockerignore_keeps_the_environment_and_local_state_out_of_the_context():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".local", ".git", "models/artifacts"} <= ignored
    assert not ignored & {"pyproject.toml", "contract", "models", "producer", "worker", "ops"}


# -- Kubernetes ----------------------------------------------------------------------------------------


def k8s_docs() -> dict[str, dict]:
    docs = [d for f in sorted((OPS / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    return {d["kind"]: d for d in docs}


def test_kubernetes_worker_probes_volumes_and_identity():
    docs = k8s_docs()
    deployment = docs["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9108}
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {kind: probe["path"] for kind, probe in probes.items()} == {
        "startupProbe": "/startupz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    assert {probe["port"] for probe in probes.values()} == {"metrics"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # a model load may take minutes
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert pod["terminationGracePeriodSeconds"] >= 30
    assert {"name": "SENTIMENT_KAFKA_CLIENT", "value": "confluent"} in container["env"]  # a GPU pod: librdkafka
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounts.values()) <= set(volumes)
    assert "emptyDir" in volumes[mounts["/home/app/.cache"]]  # HF_HOME lives below it
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e for e in container["env"]}
    assert env["SENTIMENT_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "secretKeyRef" in env["KAFKA_SASL_PASSWORD"]["valueFrom"] and "value" not in env["KAFKA_SASL_PASSWORD"]


def test_kubernetes_metrics_reach_prometheus_under_the_alerts_job():
    docs = k8s_docs()
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    monitor = docs["PodMonitor"]["spec"]
    assert pod_labels[monitor["jobLabel"]] == JOB  # up{job="sentiment-worker"} in the alerts
    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    service = docs["Service"]["spec"]
    assert service["selector"].items() <= pod_labels.items() and service["ports"][0]["targetPort"] == "metrics"


def test_keda_scales_the_worker_deployment_on_the_groups_lag():
    docs = k8s_docs()
    scaled = docs["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    (trigger,) = scaled["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka" and meta["consumerGroup"] == "sentiment-workers" and meta["topic"] == "reviews"
    assert int(meta["lagThreshold"]) > 0 and 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    assert trigger["authenticationRef"]["name"] == docs["TriggerAuthentication"]["metadata"]["name"]


def test_kubernetes_static_membership_runs_the_same_pod_as_a_statefulset():
    deployment = k8s_docs()["Deployment"]
    variant = {d["kind"]: d for d in yaml.safe_load_all(
        (OPS / "k8s" / "static-membership" / "worker-statefulset.yaml").read_text())}
    sts, scaled = variant["StatefulSet"], variant["ScaledObject"]["spec"]
    pod, base = sts["spec"]["template"], deployment["spec"]["template"]
    (container,), (base_container,) = pod["spec"]["containers"], base["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["SENTIMENT_STATIC_MEMBERSHIP"]["value"] == "true"
    assert env["SENTIMENT_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # stable: pod-0
    assert int(env["SENTIMENT_SESSION_TIMEOUT_MS"]["value"]) >= 30_000  # a restarted pod is back within it
    same = {k: v for k, v in container.items() if k != "env"}
    assert same == {k: v for k, v in base_container.items() if k != "env"}  # no drift from the Deployment
    assert [e for e in container["env"] if e["name"] in {b["name"] for b in base_container["env"]}] \
        == base_container["env"]
    assert {k: v for k, v in pod["spec"].items() if k != "containers"} == \
        {k: v for k, v in base["spec"].items() if k != "containers"}
    assert sts["spec"]["serviceName"] == k8s_docs()["Service"]["metadata"]["name"]
    assert scaled["scaleTargetRef"]["kind"] == "StatefulSet" and scaled["scaleTargetRef"]["name"] == "sentiment-worker"


def test_bench_plot_draws_every_reference_point(tmp_path):
    """make bench's PNG from a results.json shape (synthetic figures): ceiling, worker, naive, latency, pipeline."""
    from ops.bench.__main__ import plot

    results = {
        "ceiling": [{"dtype": "fp32", "max_batch_size": b, "per_second": 10.0 * b, "padding_efficiency": 0.9}
                    for b in (1, 8, 64)],
        "worker": {"fp32": {"per_second": 500.0}}, "naive_per_second": 40.0,
        "latency": [{"offered_per_second": r, "p50_s": 0.05, "p99_s": 0.2} for r in (100, 200)],
        "pipeline": {"loop": {"kafka-python": {"per_second": 8000.0}, "confluent": {"per_second": 140000.0}},
                     "worker": {"kafka-python": {"per_second": 2700.0}, "confluent": {"per_second": 4000.0}},
                     "budget": {"tokenize_per_second": 25000.0, "forward_per_second": 15000.0},
                     "memory_seam": {"per_second": 6000.0, "forward_busy": 0.9}},
    }
    path = tmp_path / "results.png"
    plot(results, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_pipeline_table_prints_each_ratio_beside_its_bound_with_kafka_in_memory():
    """make bench's pipeline lines from fixed figures: the ratios the issue sets targets for, and what the worker with
    Kafka replaced in memory reaches (no client can do better on that machine)."""
    from ops.bench.pipeline import table

    text = table({"loop": {"kafka-python": {"per_second": 20000.0}, "confluent": {"per_second": 200000.0}},
                  "worker": {"kafka-python": {"per_second": 5000.0}, "confluent": {"per_second": 6000.0}},
                  "budget": {"tokenize_per_second": 40000.0, "forward_per_second": 32000.0},
                  "memory_seam": {"per_second": 8000.0, "forward_busy": 0.9}})
    assert "worker kafka-python / kafka-python loop = 0.25 (target >= 0.4" in text
    assert ("worker confluent / worker kafka-python = 1.20 (target >= 1.5); "
            "/ slower of tokenizing and forward = 0.19") in text
    assert ("bound of each ratio on this machine: / kafka-python loop = 0.40, / worker kafka-python = 1.60, "
            "/ slower of tokenizing and forward = 0.25") in text
    assert "busy 90% of the time: 112 us a record there, 31 alone" in text


@pytest.mark.parametrize("running", [True, False])
def test_with_broker_passes_on_the_commands_exit_status_whoever_started_the_broker(tmp_path, running):
    """`make demo` / `make bench` against a broker already up (`make broker-start`) ended in exit 1 after a
    command that succeeded: the cleanup of a broker it had not started returned false from the exit trap."""
    shutil.copy(ROOT / "ops" / "kafka" / "with-broker", tmp_path / "with-broker")
    calls = tmp_path / "calls"
    stub = tmp_path / "local-broker"
    stub.write_text(f'#!/usr/bin/env bash\necho "$1" >> {calls}\n'
                    f'[[ $1 != status ]] || exit {0 if running else 1}\n')
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    for command, status in (("true", 0), ("false", 1)):
        calls.write_text("")
        done = subprocess.run([str(tmp_path / "with-broker"), command], env=env, capture_output=True)
        assert done.returncode == status, done.stderr
        assert calls.read_text().split() == (["status"] if running else ["status", "start", "stop"])
