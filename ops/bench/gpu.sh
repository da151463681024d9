#!/usr/bin/env bash
# Prepared GPU benchmark (under 5 minutes, no Kafka, no internet). Needs python3 with torch,
# transformers, tokenizers and scikit-learn, and in .gpu/ (made by `make gpu-bundle` here):
# vocab.txt (uncased BERT vocabulary) and dev.tsv (sentences).
set -euo pipefail
cd "$(dirname "$0")/../.."
bundle=${GPU_BUNDLE:-.gpu}
out=${OUT:-ops/bench/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH=. "${PYTHON:-python3}" -m ops.bench.gpu --vocab "$bundle/vocab.txt" --sentences "$bundle/dev.tsv" \
  --out "$out/gpu-results.json" "$@"
