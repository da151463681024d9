"""The benchmarks' models: a DistilBERT with random weights (its speed is real DistilBERT speed, its
accuracy is not) on the uncased vocabulary when the offline package has it, so that token counts
and tokenizing cost are those of the real model, and a logistic head fitted on its features."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from models.build import save_random_distilbert
from models.encoder import offline_folder

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "ops" / "bench" / "out"


def random_artifact(name: str, texts: list[str], data: Path, tiny: bool = False) -> Path:
    """Built once under ops/bench/out/; built again when a folder lacks the vocabulary file (made before
    transformers 5 was handled: every word was [UNK])."""
    encoder_dir, artifact = OUT / name, OUT / "artifacts" / name
    packaged = offline_folder()
    vocab = packaged / "vocab.txt" if packaged else None
    if not (encoder_dir / "config.json").is_file() or (vocab and not (encoder_dir / "vocab.txt").is_file()):
        shutil.rmtree(encoder_dir, ignore_errors=True)
        shutil.rmtree(artifact, ignore_errors=True)
        save_random_distilbert(encoder_dir, texts, vocab_file=vocab, tiny=tiny)
    if not (artifact / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "models", "train", "--data", str(data), "--encoder", str(encoder_dir),
                        "--out", str(artifact), "--limit", "300", "--dtype", "fp32"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    return artifact
