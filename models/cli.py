"""`python -m models train|eval|convert`: the tutorial's recipe as a command, with verified artifacts."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from contract.cli import DEVICE, DTYPE, QUANTIZE, Option, Parser, UserError, run
from contract.records import label_of
from contract.review_files import FORMATS
from models.artifact import Manifest, convert_artifact, save_artifact
from models.classifier import Classifier
from models.datasets import CACHE_DIR, open_labeled
from models.encoder import DEFAULT_ENCODER, POOLINGS, Encoder
from models.features import labeled_features
from models.head import C_GRID, HeadWeights, TorchHead, fit_head

EVAL_CHUNK_ROWS = 4096


def _accuracy(classifier: Classifier, spec: str, fmt: str | None, predictions: str | None = None) -> tuple[float, int]:
    """Accuracy of `classifier` on a labeled file, streamed; each row's score to `predictions` (JSONL) if given."""
    data = open_labeled(spec, fmt)
    correct = total = 0
    out = open(predictions, "w", encoding="utf-8") if predictions else None  # noqa: SIM115 - closed below
    try:
        with tqdm(desc=f"{classifier.encoder.pooling} features ({data.path.name})", unit="sent",
                  file=sys.stderr) as bar:
            for texts, labels in data.chunks(EVAL_CHUNK_ROWS):
                scores = classifier.scores(texts, progress=bar.update)
                correct += int(((scores >= 0.5) == np.asarray(labels, dtype=bool)).sum())
                if out:
                    out.writelines(json.dumps({"row": total + i, "label": label_of(s), "score": round(s, 6)}) + "\n"
                                   for i, s in enumerate(scores.tolist()))
                total += len(labels)
    finally:
        if out:
            out.close()
    return correct / total, total


def _grid(text: str) -> tuple[float, ...]:
    try:
        grid = tuple(float(c) for c in text.split(","))
    except ValueError:
        raise UserError(f"--c-grid {text!r}: expected comma-separated positive numbers") from None
    if not grid or min(grid) <= 0:
        raise UserError(f"--c-grid {text!r}: expected comma-separated positive numbers")
    return grid


def train(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    grid = _grid(args.c_grid)
    data = open_labeled(args.data, args.format)
    encoder = Encoder.load(args.encoder, args.device, args.dtype, pooling=args.pooling)
    cache = None if args.no_cache else Path(args.cache_dir)
    print(f"encoder {encoder.name} ({encoder.source}, {encoder.revision}) on {encoder.device} in "
          f"{encoder.dtype_name}, {encoder.pooling} pooling; data {data.path}; feature cache {cache or 'off'}",
          file=sys.stderr)
    with tqdm(total=args.limit or None, desc=f"{encoder.pooling} features (train)", unit="sent",
              file=sys.stderr) as bar:
        features = labeled_features(encoder, data, args.limit or None, cache, bar.update)
    print(f"features of {len(features.y)} rows: {features.encoded_rows} rows encoded, "
          f"{features.cached_rows} read from the cache", file=sys.stderr)
    x_train, x_test, y_train, y_test = train_test_split(
        features.x, features.y, test_size=args.test_size, random_state=args.seed)
    fit = fit_head(x_train, y_train, seed=args.seed, grid=grid)
    metrics = {"held_out_accuracy": float(fit.estimator.score(x_test, y_test)), "cv_accuracy": fit.cv_accuracy,
               "best_C": fit.best_c, "n_train": len(y_train), "n_test": len(y_test), "train_seconds": None}
    if args.eval:
        head = TorchHead(HeadWeights.of(fit.estimator), encoder.device)
        accuracy, n = _accuracy(Classifier(encoder, head), args.eval, None)
        metrics.update(eval_accuracy=accuracy, eval_n=n, eval_data=args.eval)
    metrics["train_seconds"] = round(time.perf_counter() - started, 1)
    artifact = save_artifact(Path(args.out), fit.estimator, Manifest.of(encoder, data.sha256, metrics),
                             with_joblib=not args.no_joblib)
    summary = {"artifact": str(args.out), "model": artifact.model_id, "encoder": encoder.name,
               "pooling": encoder.pooling, "dtype": encoder.dtype_name, **metrics,
               "encoded_rows": features.encoded_rows, "cached_rows": features.cached_rows}
    print(json.dumps(summary))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    classifier = Classifier.load(args.model, args.device, args.dtype, args.quantize)
    started = time.perf_counter()
    accuracy, n = _accuracy(classifier, args.data, args.format, args.predictions)
    encoder = classifier.encoder
    print(json.dumps({"accuracy": round(accuracy, 4), "n": n, "model": classifier.model_id, "encoder": encoder.name,
                      "pooling": encoder.pooling, "device": str(encoder.device), "dtype": encoder.dtype_name,
                      "quantize": args.quantize, "seconds": round(time.perf_counter() - started, 1)}))
    return 0


def convert(args: argparse.Namespace) -> int:
    print(f"unpickling {args.model}/head.joblib (its sha256 checked first): convert only artifacts you trust",
          file=sys.stderr)
    artifact = convert_artifact(Path(args.model))
    print(json.dumps({"artifact": str(args.model), "model": artifact.model_id,
                      "encoder_revision": artifact.manifest.encoder_revision}))
    return 0


def parser() -> Parser:
    root = Parser(prog="sentiment-models", description=__doc__)
    root.add_version("sentiment-models")
    commands = root.add_subparsers(dest="command", required=True)
    common = (Option("format", None, "data format (default: from the file extension)", FORMATS), DEVICE, DTYPE)

    t = commands.add_parser("train", help="extract pooled features and fit the logistic head")
    t.add_options((
        Option("data", None, "PATH | URL | sst2 (a tsv/csv/jsonl of any size, streamed)", required=True),
        Option("out", None, "artifact folder, e.g. models/artifacts/NAME", required=True),
        Option("encoder", DEFAULT_ENCODER, "hub name or local model folder"),
        Option("pooling", "cls", "cls: the [CLS] vector (the tutorial's); mean: attention-masked mean of the last "
                                 "layer", POOLINGS),
        Option("limit", 2000, "first N labeled rows (0 = all)"),
        Option("test_size", 0.25, "share of the rows held out"),
        Option("seed", 42, "random seed of the split and the search"),
        Option("c_grid", ",".join(str(c) for c in C_GRID), "values of C to cross-validate"),
        Option("eval", None, "also report accuracy on this labeled file"),
        Option("cache_dir", str(CACHE_DIR / "features"), "where encoded features are cached"),
        Option("no_cache", False, "encode everything, read and write no cache"),
        Option("no_joblib", False, "write no head.joblib (the scikit-learn estimator)"),
        *common))
    t.set_defaults(func=train)

    e = commands.add_parser("eval", help="accuracy of an artifact on labeled data (one JSON line)")
    e.add_options((
        Option("model", None, "artifact folder", required=True),
        Option("data", None, "PATH | URL | sst2", required=True),
        QUANTIZE,
        Option("predictions", None, "also write each row's label and score here (JSONL)"),
        *common))
    e.set_defaults(func=evaluate)

    c = commands.add_parser("convert", help="turn a format-1 artifact (head.joblib) into format 2 (safetensors)")
    c.add_options((Option("model", None, "artifact folder", required=True),))
    c.set_defaults(func=convert)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


def cli() -> None:
    """The `sentiment-models` console script."""
    run(main)


if __name__ == "__main__":
    cli()
