"""Labeled sentences for training and evaluation: a file, a URL, or `sst2`.

`sst2` is `$SST2_DIR/train.tsv` when set, else the public train.tsv that the tutorial
reads, downloaded once into the user's cache.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from contract.cli import UserError
from contract.review_files import BadRow, infer_format, read_reviews
from models.checksums import sha256_file

SST2_URL = "https://github.com/clairett/pytorch-sentiment-classification/raw/master/data/SST2/train.tsv"
SST2_DEV_URL = SST2_URL.replace("train.tsv", "dev.tsv")
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "review-sentiment"


@dataclass(frozen=True)
class LabeledFile:
    """A labeled file read as a stream, so that its size does not matter."""

    path: Path
    fmt: str | None
    sha256: str

    def rows(self, limit: int | None = None) -> Iterator[tuple[str, int]]:
        """(text, label) of the first `limit` rows (all when None); a malformed or unlabeled row is an
        error naming its line."""
        count = 0
        for row in read_reviews(str(self.path), self.fmt):
            if limit and count >= limit:
                return
            if isinstance(row, BadRow):
                raise UserError(f"{self.path}:{row.line}: {row.reason}")
            if row.label is None:
                raise UserError(f"{self.path}:{row.line}: row has no label (0 or 1)")
            count += 1
            yield row.text, row.label
        if not count:
            raise UserError(f"{self.path} holds no labeled rows")

    def chunks(self, size: int, limit: int | None = None) -> Iterator[tuple[list[str], list[int]]]:
        """The rows in consecutive chunks of `size` (the last one shorter)."""
        texts: list[str] = []
        labels: list[int] = []
        for text, label in self.rows(limit):
            texts.append(text)
            labels.append(label)
            if len(texts) == size:
                yield texts, labels
                texts, labels = [], []
        if texts:
            yield texts, labels


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


def open_labeled(spec: str, fmt: str | None = None) -> LabeledFile:
    """A labeled file by path, URL or `sst2`/`sst2-dev`, hashed (streaming) for the manifest and the cache."""
    path = resolve(spec)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    infer_format(str(path), fmt)  # an unknown extension fails here, before any work
    return LabeledFile(path, fmt, sha256_file(path))
