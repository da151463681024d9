# The README's two commands: `make demo` and `make test`. Both do their own set-up.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
WITH_BROKER := ops/kafka/with-broker
export SST2_DIR ?= $(if $(wildcard ../shared/data/sst2/dev.tsv),$(abspath ../shared/data/sst2),)

.PHONY: setup tools test test-long soak stack-test lint demo bench profile gpu-bundle broker-start broker-stop clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,offline,fast]"
	@rm -f $(VENV)/.installed-* && touch $@

tools:  ## outside programs the tests use: kcat and Prometheus (promtool) from Debian
	@ops/install-tools

lint: setup
	$(PY) -m ruff check .

test: export KAFKA_AUTO_CREATE_TOPICS ?= false
test: setup tools  ## everything but the long fault variants
	$(WITH_BROKER) $(PY) -m pytest -ra -m "not long" $(PYTEST_ARGS)

test-long: export KAFKA_AUTO_CREATE_TOPICS ?= false
test-long: setup tools  ## the long fault variants (CI runs them when time allows)
	$(WITH_BROKER) $(PY) -m pytest -ra -m long $(PYTEST_ARGS)

soak: export KAFKA_AUTO_CREATE_TOPICS ?= false
soak: setup  ## MINUTES=N (5) of a steady stream with a fault a minute, under each guarantee
	$(WITH_BROKER) bash -c '$(PY) -m ops.soak --minutes $(or $(MINUTES),5) --guarantee at-least-once && \
	  $(PY) -m ops.soak --minutes $(or $(MINUTES),5) --guarantee exactly-once'

stack-test: setup tools  ## docker-compose.yml run for real (Docker engine, local images), then testcontainers
	ops/stack/stack-test

demo: setup
	$(WITH_BROKER) $(PY) -m ops.demo $(DEMO_ARGS)

bench: setup
	$(WITH_BROKER) $(PY) -m ops.bench $(BENCH_ARGS)

profile: setup  ## the pipeline benchmark with each worker sampled by py-spy (top functions printed)
	$(WITH_BROKER) $(PY) -m ops.bench.pipeline --profile $(PROFILE_ARGS)

broker-start:
	ops/kafka/local-broker start

broker-stop:
	ops/kafka/local-broker stop

clean:
	ops/kafka/local-broker stop || true
	rm -rf .local $(VENV)

gpu-bundle: setup  ## what ops/bench/gpu.sh needs on a GPU machine: the uncased vocabulary, sentences, pure-Python wheels
	@mkdir -p .gpu/wheels
	$(PY) -m pip download -q --no-deps -d .gpu/wheels "kafka-python==$$($(PY) -c 'import kafka; print(kafka.__version__)')" \
	  "prometheus-client==$$($(PY) -c 'from importlib.metadata import version; print(version("prometheus-client"))')"
	$(PY) -c "from models.encoder import offline_folder; import shutil; shutil.copy(offline_folder() / 'vocab.txt', '.gpu/vocab.txt')"
	$(PY) -c "from models.datasets import resolve; import shutil; shutil.copy(resolve('sst2-dev'), '.gpu/dev.tsv')"
