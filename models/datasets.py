"""Labeled sentences for training and evaluation: a file, a URL, or `sst2`.

`sst2` is `$SST2_DIR/train.tsv` when set, else the public train.tsv that the tutorial
reads, downloaded once into the user's cache.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from contract.cli import UserError
from contract.review_files import BadRow, read_reviews

SST2_URL = "https://github.com/clairett/pytorch-sentiment-classification/raw/master/data/SST2/train.tsv"
SST2_DEV_URL = SST2_URL.replace("train.tsv", "dev.tsv")
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "review-sentiment"


@dataclass(frozen=True)
class LabeledData:
    texts: list[str]
    labels: list[int]
    sha256: str
    origin: str


def _download(url: str) -> Path:
    target = CACHE_DIR / hashlib.sha256(url.encode()).hexdigest()[:16] / Path(url).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            data = response.read()
    except OSError as err:
        raise UserError(f"cannot download {url} ({err}); set SST2_DIR or pass a local file") from None
    tmp = target.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


def resolve(spec: str) -> Path:
    """A local path for `spec`: a path, a URL, `sst2` (the train split) or `sst2-dev`."""
    if spec in ("sst2", "sst2-dev"):
        name = "train.tsv" if spec == "sst2" else "dev.tsv"
        folder = os.environ.get("SST2_DIR")
        if folder:
            path = Path(folder) / name
            if not path.is_file():
                raise UserError(f"SST2_DIR={folder} has no {name}")
            return path
        return _download(SST2_URL if spec == "sst2" else SST2_DEV_URL)
    if spec.startswith(("http://", "https://")):
        return _download(spec)
    return Path(spec)


def load_labeled(spec: str, fmt: str | None = None, limit: int | None = None) -> LabeledData:
    """Read labeled rows; any malformed or unlabeled row is an error naming its line."""
    path = resolve(spec)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    texts: list[str] = []
    labels: list[int] = []
    for row in read_reviews(str(path), fmt):
        if isinstance(row, BadRow):
            raise UserError(f"{path}:{row.line}: {row.reason}")
        if row.label is None:
            raise UserError(f"{path}:{row.line}: row has no label (0 or 1)")
        texts.append(row.text)
        labels.append(row.label)
        if limit and len(texts) >= limit:
            break
    if not texts:
        raise UserError(f"{path} holds no labeled rows")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return LabeledData(texts, labels, sha, str(path))
