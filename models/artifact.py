"""The artifact folder: `manifest.json` + `head.safetensors` (+ optionally `head.joblib` for users).

The worker loads only the safetensors head, two arrays and no code; `head.joblib` (the
scikit-learn estimator) is for scikit-learn users. Each file present is checked against the
manifest's sha256 before it is read. The checksum catches corruption and a head swapped on its
own; it does not stop whoever can rewrite the folder, who can rewrite the manifest too. That
is why the head is a format that cannot run code: the worst a forged artifact can do is
classify badly. The manifest also pins the encoder (revision) and says how to pool it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sklearn
import torch
import transformers
from sklearn.linear_model import LogisticRegression

from contract.cli import UserError
from models.checksums import sha256_file
from models.encoder import POOLINGS, Encoder
from models.head import HeadWeights

HEAD_FILE = "head.safetensors"
JOBLIB_FILE = "head.joblib"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2
MAX_HEAD_BYTES = 1 << 20  # a head of hidden size 65536 in float64 is 512 KiB


@dataclass
class Manifest:
    encoder: str
    encoder_source: str
    encoder_revision: str | None  # hub commit, or "sha256:..." over a local folder's files
    hidden_size: int
    dtype: str
    data_sha256: str
    metrics: dict[str, Any]
    pooling: str = "cls"
    head_sha256: str = ""  # of head.safetensors: the model id comes from it
    joblib_sha256: str | None = None  # of head.joblib, when the artifact has one
    labels: list[str] = field(default_factory=lambda: ["negative", "positive"])
    versions: dict[str, str] = field(default_factory=lambda: {
        "scikit-learn": sklearn.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
    })
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    format_version: int = FORMAT_VERSION

    @classmethod
    def of(cls, encoder: Encoder, data_sha256: str, metrics: dict[str, Any]) -> Manifest:
        """What an artifact records of the encoder its head was trained on."""
        return cls(encoder=encoder.name, encoder_source=encoder.source, encoder_revision=encoder.revision,
                   hidden_size=encoder.hidden_size, dtype=encoder.dtype_name, data_sha256=data_sha256,
                   metrics=metrics, pooling=encoder.pooling)


@dataclass(frozen=True)
class Artifact:
    name: str
    folder: Path
    manifest: Manifest
    head: HeadWeights

    @property
    def model_id(self) -> str:
        """`<artifact name>@<first 12 hex of head.safetensors' sha256>`, as results carry it."""
        return f"{self.name}@{self.manifest.head_sha256[:12]}"

    def load_estimator(self) -> LogisticRegression:
        """The scikit-learn estimator from `head.joblib`, for scikit-learn code (never the worker).
        Unpickling runs code: only for artifacts you trust; its sha256 is checked first."""
        import joblib

        path = self.folder / JOBLIB_FILE
        if self.manifest.joblib_sha256 is None or not path.is_file():
            raise UserError(f"{self.folder} has no {JOBLIB_FILE}; its weights are in {HEAD_FILE}")
        _check_sha(path, self.manifest.joblib_sha256)
        return joblib.load(path)


def save_artifact(folder: Path, estimator: LogisticRegression, manifest: Manifest,
                  with_joblib: bool = True) -> Artifact:
    """Write the head's weights (safetensors), optionally the estimator (joblib), then the manifest."""
    import joblib

    folder.mkdir(parents=True, exist_ok=True)
    head = HeadWeights.of(estimator)
    data = head.to_bytes()
    (folder / HEAD_FILE).write_bytes(data)
    manifest.head_sha256 = hashlib.sha256(data).hexdigest()
    (folder / JOBLIB_FILE).unlink(missing_ok=True)
    manifest.joblib_sha256 = None
    if with_joblib:
        joblib.dump(estimator, folder / JOBLIB_FILE)
        manifest.joblib_sha256 = sha256_file(folder / JOBLIB_FILE)
    (folder / MANIFEST_FILE).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    return Artifact(folder.resolve().name, folder, manifest, head)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest as JSON, of whatever format version."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"no model artifact at {folder} (needs {MANIFEST_FILE} and {HEAD_FILE}); train one first")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"model manifest {path} is unreadable: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"model manifest {path} is not a JSON object")
    return data


def load_artifact(folder: str | Path) -> Artifact:
    """Manifest and safetensors head, every file present checked first; never unpickles anything."""
    folder = Path(folder)
    data = read_manifest(folder)
    version = data.get("format_version")
    if version == 1:
        raise UserError(f"{folder} is an artifact of format 1 (a pickled {JOBLIB_FILE}, which is no longer "
                        f"loaded); convert it with `python -m models convert --model {folder}` if you trust it, "
                        "or retrain it with `python -m models train`")
    if version != FORMAT_VERSION:
        raise UserError(f"{folder} is an artifact of format {version!r}; this code reads format {FORMAT_VERSION}")
    try:
        manifest = Manifest(**data)
    except TypeError as err:
        raise UserError(f"model manifest {folder / MANIFEST_FILE} is unreadable: {err}") from None
    if manifest.pooling not in POOLINGS:
        raise UserError(f"refusing {folder}: its pooling {manifest.pooling!r} is unknown to this code "
                        f"(it knows {', '.join(POOLINGS)})")
    joblib_path = folder / JOBLIB_FILE
    if joblib_path.is_file():
        if manifest.joblib_sha256 is None:
            raise UserError(f"refusing {folder}: {JOBLIB_FILE} is there but the manifest does not vouch for it")
        _check_sha(joblib_path, manifest.joblib_sha256)
    head_path = folder / HEAD_FILE
    if not head_path.is_file():
        raise UserError(f"no model artifact at {folder} (needs {MANIFEST_FILE} and {HEAD_FILE}); train one first")
    if head_path.stat().st_size > MAX_HEAD_BYTES:
        raise UserError(f"refusing {head_path}: {head_path.stat().st_size} bytes is no logistic head")
    data = head_path.read_bytes()  # hashed and parsed from the same bytes
    _check_sha(head_path, manifest.head_sha256, hashlib.sha256(data).hexdigest())
    head = HeadWeights.from_bytes(data, str(head_path))
    if head.hidden_size != manifest.hidden_size:
        raise UserError(f"refusing {head_path}: a head of size {head.hidden_size}, the manifest says "
                        f"{manifest.hidden_size}")
    return Artifact(folder.resolve().name, folder, manifest, head)


def _check_sha(path: Path, expected: str, actual: str | None = None) -> None:
    actual = actual or sha256_file(path)
    if actual != expected:
        raise UserError(f"refusing {path}: its sha256 {actual[:12]}… does not match the manifest's "
                        f"{expected[:12]}… (tampered or corrupted)")


def convert_artifact(folder: Path) -> Artifact:
    """Format 1 to 2: unpickle `head.joblib` (after its sha256 check; only for artifacts you trust), write
    its weights as `head.safetensors` and pin the encoder as it is now (format 1 did not for folders)."""
    import joblib

    data = read_manifest(folder)
    if data.get("format_version") != 1:
        raise UserError(f"{folder} is not a format-1 artifact; nothing to convert")
    path = folder / JOBLIB_FILE
    if not path.is_file():
        raise UserError(f"{folder} has no {JOBLIB_FILE} to convert")
    _check_sha(path, str(data.get("head_sha256")))
    estimator = joblib.load(path)
    hidden = data.get("hidden_size")
    if not isinstance(estimator, LogisticRegression) or estimator.coef_.shape != (1, hidden):
        raise UserError(f"refusing {path}: not a logistic head of hidden size {hidden}")
    encoder = Encoder.load(data["encoder"], "cpu", "fp32", revision=data.get("encoder_revision"))
    if encoder.hidden_size != hidden:
        raise UserError(f"encoder {data['encoder']} has hidden size {encoder.hidden_size}, the head {hidden}")
    kept = {k: v for k, v in data.items() if k not in ("head_sha256", "format_version", "encoder_revision")}
    return save_artifact(folder, estimator, Manifest(**kept, encoder_revision=encoder.revision))
