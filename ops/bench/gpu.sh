#!/usr/bin/env bash
# Prepared GPU benchmark (under 5 minutes, no broker, no internet): the bare model, and the worker loop
# with Kafka replaced in memory at the client seam. Needs python3 with torch, transformers, tokenizers,
# numpy and scikit-learn, and in .gpu/ (made by `make gpu-bundle` here): vocab.txt (uncased BERT
# vocabulary), dev.tsv (sentences) and wheels/ (the pure-Python kafka-python and prometheus-client that
# the worker's modules import; nothing connects to a broker).
set -euo pipefail
cd "$(dirname "$0")/../.."
bundle=${GPU_BUNDLE:-.gpu}
out=${OUT:-ops/bench/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
wheels=""
if [[ -d $bundle/wheels ]]; then wheels=$(find "$bundle/wheels" -name '*.whl' | sort | tr '\n' ':'); fi
PYTHONPATH=".:$wheels" "${PYTHON:-python3}" -m ops.bench.gpu --vocab "$bundle/vocab.txt" --sentences "$bundle/dev.tsv" \
  --out "$out/gpu-results.json" "$@"
