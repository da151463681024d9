"""The artifact folder: `head.joblib` (the scikit-learn head) + `manifest.json` that vouches for it.

Loading checks the head's sha256 before unpickling (a pickle runs code) and the hidden size
against the encoder, so that a tampered or mismatched artifact is refused with one line.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import joblib
import sklearn
import torch
import transformers
from sklearn.linear_model import LogisticRegression

from contract.cli import UserError

HEAD_FILE = "head.joblib"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Manifest:
    encoder: str
    encoder_source: str
    encoder_revision: str | None
    hidden_size: int
    dtype: str
    data_sha256: str
    metrics: dict[str, Any]
    head_sha256: str = ""
    pooling: str = "cls"
    labels: list[str] = field(default_factory=lambda: ["negative", "positive"])
    versions: dict[str, str] = field(default_factory=lambda: {
        "scikit-learn": sklearn.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
    })
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    format_version: int = FORMAT_VERSION


@dataclass(frozen=True)
class Artifact:
    name: str
    manifest: Manifest
    estimator: LogisticRegression

    @property
    def model_id(self) -> str:
        """`<artifact name>@<first 12 hex of the head's sha256>`, as results carry it."""
        return f"{self.name}@{self.manifest.head_sha256[:12]}"


def save_artifact(folder: Path, estimator: LogisticRegression, manifest: Manifest) -> Artifact:
    folder.mkdir(parents=True, exist_ok=True)
    joblib.dump(estimator, folder / HEAD_FILE)
    manifest.head_sha256 = sha256_file(folder / HEAD_FILE)
    (folder / MANIFEST_FILE).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    return Artifact(folder.resolve().name, manifest, estimator)


def load_artifact(folder: str | Path) -> Artifact:
    folder = Path(folder)
    head, manifest_path = folder / HEAD_FILE, folder / MANIFEST_FILE
    if not manifest_path.is_file() or not head.is_file():
        raise UserError(f"no model artifact at {folder} (needs {HEAD_FILE} and {MANIFEST_FILE}); train one first")
    try:
        manifest = Manifest(**json.loads(manifest_path.read_text()))
    except (ValueError, TypeError) as err:
        raise UserError(f"model manifest {manifest_path} is unreadable: {err}") from None
    actual = sha256_file(head)
    if actual != manifest.head_sha256:
        raise UserError(f"refusing {head}: its sha256 {actual[:12]}… does not match the manifest's "
                        f"{manifest.head_sha256[:12]}… (tampered or corrupted)")
    estimator = joblib.load(head)
    if not isinstance(estimator, LogisticRegression) or estimator.coef_.shape[1] != manifest.hidden_size:
        raise UserError(f"refusing {head}: not a logistic head of hidden size {manifest.hidden_size}")
    return Artifact(folder.resolve().name, manifest, estimator)


def check_encoder(artifact: Artifact, hidden_size: int) -> None:
    if hidden_size != artifact.manifest.hidden_size:
        raise UserError(f"encoder hidden size {hidden_size} does not match the head's {artifact.manifest.hidden_size}")
