"""GPU benchmark: records/s by batch size and dtype, and GPU memory, for a lent NVIDIA machine.

No broker and no internet. For each dtype and batch size: the bare model (an in-memory source cut
by the worker's own batcher, pre-tokenized, the same encoder + head code) and, at --worker-sizes,
the real worker loop at the same caps with Kafka replaced in memory at the client seam
(ops/bench/seam.py: tokenizing, batcher, tracker, delivery and encoding all run as in production).
The encoder is DistilBERT with random weights (real DistilBERT speed), built here with the uncased
vocabulary file given by --vocab.

    bash ops/bench/gpu.sh            # or: python -m ops.bench.gpu --vocab VOCAB --sentences TSV
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from sklearn.linear_model import LogisticRegression

from contract.review_files import ReviewRow, read_reviews
from models.build import save_random_distilbert
from models.classifier import Classifier
from models.encoder import POOLINGS, Encoder
from models.head import HeadWeights, TorchHead
from ops.bench.ceiling import measure
from ops.bench.seam import worker_rate


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.gpu", description=__doc__)
    parser.add_argument("--vocab", required=True, help="uncased BERT vocab.txt")
    parser.add_argument("--sentences", required=True, help="a tsv/txt of review sentences")
    parser.add_argument("--batch-sizes", default="1,8,32,64,128,256")
    parser.add_argument("--dtypes", default="fp16,bf16,fp32")
    parser.add_argument("--pooling", default="cls", choices=POOLINGS, help="as an artifact's manifest says")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per configuration")
    parser.add_argument("--out", help="also write the figures as JSON here")
    parser.add_argument("--worker-sizes", default="64,128,256", help="batch sizes at which the worker loop runs too")
    parser.add_argument("--device", default="cuda", help="cuda (cpu only to try the script out)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random DistilBERT (dim 32, 2 layers): on a CPU, "
                        "the worker's own path at a near-free model")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("error: no CUDA device here", file=sys.stderr)
        return 2
    texts = [r.text for r in read_reviews(args.sentences) if isinstance(r, ReviewRow)]
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"device: {device}; torch {torch.__version__}; {len(texts)} sentences", file=sys.stderr)
    folder = save_random_distilbert(Path(tempfile.mkdtemp()) / "random-distilbert", vocab_file=Path(args.vocab),
                                    tiny=args.tiny)
    rows: list[dict] = []
    vocabulary = len(Path(args.vocab).read_text(encoding="utf-8").splitlines())  # all in the tokenizer
    report = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
              "vocabulary": vocabulary, "rows": rows}
    worker_sizes = {int(s) for s in args.worker_sizes.split(",") if s}
    for dtype in args.dtypes.split(","):
        encoder = Encoder.load(str(folder), args.device, dtype, pooling=args.pooling)
        if len(encoder.tokenizer) != vocabulary:
            raise SystemExit(f"error: the tokenizer has {len(encoder.tokenizer)} tokens, {args.vocab} {vocabulary}")
        encoder.trace()  # as the worker runs it: the bare model and the worker loop below share it
        print(f"{dtype}: encoder graph {encoder.graph}", file=sys.stderr)
        rng = np.random.default_rng(0)
        estimator = LogisticRegression().fit(rng.normal(size=(64, encoder.hidden_size)), np.arange(64) % 2)
        classifier = Classifier(encoder, TorchHead(HeadWeights.of(estimator), encoder.device))
        for size in [int(s) for s in args.batch_sizes.split(",")]:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            result = measure(classifier, texts, size, max_batch_tokens=size * 128, min_seconds=args.seconds)
            row = {"dtype": dtype, "graph": encoder.graph, "pooling": args.pooling, "max_batch_size": size,
                   "records_per_s": round(result.per_second, 1),
                   "padding_efficiency": round(result.padding_efficiency, 3),
                   "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else 0.0,
                   "wall_s": round(time.perf_counter() - started, 1)}
            through = ""
            if size in worker_sizes:
                count = max(16 * size, int(result.per_second * args.seconds))
                try:
                    run = worker_rate(classifier, texts, size, size * 128, count, timeout_s=10 * args.seconds + 60)
                    row |= {"worker_records_per_s": round(run.per_second, 1),
                            "worker_vs_bare": round(run.per_second / result.per_second, 3),
                            "worker_forward_busy": round(run.forward_busy, 3)}
                    through = (f"  worker {run.per_second:9.1f} records/s ({row['worker_vs_bare']:.2f} x bare, "
                               f"forward busy {run.forward_busy:.0%})")
                except RuntimeError as err:  # a worker far below the bare model: the other rows still count
                    row["worker_error"] = str(err)
                    through = f"  worker: {err}"
            rows.append(row)
            if args.out:  # after every row: a run cut short keeps what it measured
                Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
            print(f"{dtype:>5} batch {size:>4}: {row['records_per_s']:9.1f} records/s  "
                  f"peak {row['peak_gpu_mib']:8.1f} MiB  padding {row['padding_efficiency']:.3f}{through}", flush=True)
        del encoder, classifier
        if cuda:
            torch.cuda.empty_cache()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
