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

from contract.cli import apply_env_defaults, run
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


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--format", choices=FORMATS, help="data format (default: from the file extension)")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
        p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))

    t = commands.add_parser("train", help="extract [CLS] features and fit the logistic head")
    t.add_argument("--data", required=True, help="PATH | URL | sst2")
    t.add_argument("--out", required=True, help="artifact folder, e.g. models/artifacts/NAME")
    t.add_argument("--encoder", default=DEFAULT_ENCODER, help="hub name or local model folder")
    t.add_argument("--limit", type=int, default=2000, help="first N labeled rows (0 = all)")
    t.add_argument("--test-size", type=float, default=0.25)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--eval", help="also report accuracy on this labeled file")
    common(t)
    t.set_defaults(func=train)

    e = commands.add_parser("eval", help="accuracy of an artifact on labeled data (one JSON line)")
    e.add_argument("--model", required=True, help="artifact folder")
    e.add_argument("--data", required=True, help="PATH | URL | sst2")
    e.add_argument("--quantize", default="none", choices=("none", "int8"))
    common(e)
    e.set_defaults(func=evaluate)
    for sub in (t, e):
        apply_env_defaults(sub)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    run(main)
