"""`python -m models train|eval`: the tutorial's recipe as a command, with verified artifacts."""

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

from contract.cli import DEVICE, DTYPE, QUANTIZE, Option, Parser, run
from contract.review_files import FORMATS
from models.artifact import Manifest, check_encoder, load_artifact, save_artifact
from models.datasets import load_labeled
from models.encoder import DEFAULT_ENCODER, Encoder
from models.head import TorchHead, fit_head


def _features(encoder: Encoder, texts: list[str], what: str) -> np.ndarray:
    with tqdm(total=len(texts), desc=f"[CLS] features ({what})", unit="sent", file=sys.stderr) as bar:
        return encoder.embed(texts, progress=bar.update)


def _accuracy(encoder: Encoder, head: TorchHead, spec: str, fmt: str | None) -> tuple[float, int]:
    import torch

    data = load_labeled(spec, fmt)
    features = torch.as_tensor(_features(encoder, data.texts, Path(data.origin).name), device=encoder.device)
    predicted = (head(features) >= 0.5).long().cpu().numpy()
    return float((predicted == np.asarray(data.labels)).mean()), len(data.labels)


def train(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    data = load_labeled(args.data, args.format, args.limit or None)
    encoder = Encoder.load(args.encoder, args.device, args.dtype)
    print(f"encoder {encoder.name} ({encoder.source}) on {encoder.device} in {encoder.dtype_name}; "
          f"{len(data.texts)} sentences from {data.origin}", file=sys.stderr)
    features = _features(encoder, data.texts, "train")
    x_train, x_test, y_train, y_test = train_test_split(
        features, np.asarray(data.labels), test_size=args.test_size, random_state=args.seed)
    fit = fit_head(x_train, y_train, seed=args.seed)
    metrics = {"held_out_accuracy": float(fit.estimator.score(x_test, y_test)), "cv_accuracy": fit.cv_accuracy,
               "best_C": fit.best_c, "n_train": len(y_train), "n_test": len(y_test),
               "train_seconds": None}
    manifest = Manifest(encoder=encoder.name, encoder_source=encoder.source, encoder_revision=encoder.revision,
                        hidden_size=encoder.hidden_size, dtype=encoder.dtype_name, data_sha256=data.sha256,
                        metrics=metrics)
    if args.eval:
        accuracy, n = _accuracy(encoder, TorchHead(fit.estimator, encoder.device), args.eval, None)
        metrics.update(eval_accuracy=accuracy, eval_n=n, eval_data=args.eval)
    metrics["train_seconds"] = round(time.perf_counter() - started, 1)
    artifact = save_artifact(Path(args.out), fit.estimator, manifest)
    summary = {"artifact": str(args.out), "model": artifact.model_id, "encoder": encoder.name,
               "dtype": encoder.dtype_name, **metrics}
    print(json.dumps(summary))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    artifact = load_artifact(args.model)
    encoder = Encoder.load(artifact.manifest.encoder, args.device, args.dtype, args.quantize)
    check_encoder(artifact, encoder.hidden_size)
    started = time.perf_counter()
    accuracy, n = _accuracy(encoder, TorchHead(artifact.estimator, encoder.device), args.data, args.format)
    print(json.dumps({"accuracy": round(accuracy, 4), "n": n, "model": artifact.model_id, "encoder": encoder.name,
                      "device": str(encoder.device), "dtype": encoder.dtype_name, "quantize": args.quantize,
                      "seconds": round(time.perf_counter() - started, 1)}))
    return 0


def parser() -> Parser:
    root = Parser(prog="sentiment-models", description=__doc__)
    root.add_version("sentiment-models")
    commands = root.add_subparsers(dest="command", required=True)
    common = (Option("format", None, "data format (default: from the file extension)", FORMATS), DEVICE, DTYPE)

    t = commands.add_parser("train", help="extract [CLS] features and fit the logistic head")
    t.add_options((
        Option("data", None, "PATH | URL | sst2", required=True),
        Option("out", None, "artifact folder, e.g. models/artifacts/NAME", required=True),
        Option("encoder", DEFAULT_ENCODER, "hub name or local model folder"),
        Option("limit", 2000, "first N labeled rows (0 = all)"),
        Option("test_size", 0.25, "share of the rows held out"),
        Option("seed", 42, "random seed of the split and the search"),
        Option("eval", None, "also report accuracy on this labeled file"),
        *common))
    t.set_defaults(func=train)

    e = commands.add_parser("eval", help="accuracy of an artifact on labeled data (one JSON line)")
    e.add_options((
        Option("model", None, "artifact folder", required=True),
        Option("data", None, "PATH | URL | sst2", required=True),
        QUANTIZE,
        *common))
    e.set_defaults(func=evaluate)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


def cli() -> None:
    """The `sentiment-models` console script."""
    run(main)


if __name__ == "__main__":
    cli()
