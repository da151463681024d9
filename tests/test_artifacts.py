"""Artifact format 2 as the worker loads it: a safetensors head that is never unpickled, the pooling
and the encoder revision the manifest records, the Python API, format-1 conversion, the feature cache."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest

import models.features
from contract.cli import UserError
from models.artifact import (
    HEAD_FILE,
    JOBLIB_FILE,
    MANIFEST_FILE,
    Manifest,
    convert_artifact,
    load_artifact,
    save_artifact,
)
from models.classifier import Classifier
from models.datasets import open_labeled
from models.encoder import OFFLINE_HUB_NAME, Encoder, offline_folder
from models.features import labeled_features
from models.head import HeadWeights, fit_head
from tests.conftest import ROOT, labeled_sentences

TEXTS = ["a wonderful , moving film", "ugly and tedious ; the worst movie of the year", "fine",
         "great acting and a smart script ; a flat , lifeless bore " * 3]


def train_artifact(encoder_dir: Path, folder: Path, pooling: str) -> Path:
    """An artifact trained in-process the way `models train` does."""
    encoder = Encoder.load(str(encoder_dir), device="cpu", dtype="fp32", pooling=pooling)
    texts, labels = labeled_sentences()
    fit = fit_head(encoder.embed(texts), np.asarray(labels), grid=(1.0,))
    save_artifact(folder, fit.estimator, Manifest.of(encoder, data_sha256="0" * 64, metrics={}))
    return folder


@pytest.fixture(scope="module")
def mean_artifact(tiny_encoder_dir, tmp_path_factory) -> Path:
    return train_artifact(tiny_encoder_dir, tmp_path_factory.mktemp("artifacts") / "tiny-mean", "mean")


def copy_of(artifact: Path, folder: Path) -> Path:
    shutil.copytree(artifact, folder)
    return folder


def sklearn_scores(artifact: Path, texts: list[str]) -> np.ndarray:
    """The reference: scikit-learn's predict_proba on features from the encoder, pooled as recorded."""
    manifest = load_artifact(artifact).manifest
    encoder = Encoder.load(manifest.encoder, device="cpu", dtype="fp32", pooling=manifest.pooling)
    return load_artifact(artifact).load_estimator().predict_proba(encoder.embed(texts))[:, 1]


def forbid_unpickling(monkeypatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("something tried to unpickle")

    for module, name in ((pickle, "load"), (pickle, "loads"), (joblib, "load")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("keep_joblib", [True, False])
def test_worker_loader_serves_without_ever_unpickling(mean_artifact, tmp_path, monkeypatch, keep_joblib):
    expected = sklearn_scores(mean_artifact, TEXTS)
    folder = copy_of(mean_artifact, tmp_path / "a")
    if not keep_joblib:
        (folder / JOBLIB_FILE).unlink()
    forbid_unpickling(monkeypatch)
    artifact = load_artifact(folder)  # what worker/__main__.py calls, then Classifier.load
    classifier = Classifier.load(artifact, device="cpu", dtype="fp32")
    assert classifier.encoder.pooling == "mean"
    np.testing.assert_allclose(classifier.scores(TEXTS), expected, atol=1e-5)
    if keep_joblib:
        with pytest.raises(AssertionError, match="unpickle"):
            artifact.load_estimator()  # the patch is live: the loader above got by without it


def test_python_api_predicts_labels_and_scores_like_sklearn_in_any_batch(mean_artifact):
    classifier = Classifier.load(mean_artifact, device="cpu", dtype="fp32")
    predictions = classifier.predict(TEXTS)
    scores = np.array([p.score for p in predictions])
    np.testing.assert_allclose(scores, sklearn_scores(mean_artifact, TEXTS), atol=1e-5)
    assert [p.label for p in predictions] == ["positive" if s >= 0.5 else "negative" for s in scores]
    alone = np.array([classifier.predict([t])[0].score for t in TEXTS])
    np.testing.assert_allclose(scores, alone, atol=1e-5)
    assert classifier.model_id == load_artifact(mean_artifact).model_id


def test_unknown_pooling_is_refused(mean_artifact, tmp_path):
    folder = copy_of(mean_artifact, tmp_path / "a")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(json.dumps(dict(manifest, pooling="max")))
    with pytest.raises(UserError, match="pooling 'max' is unknown to this code"):
        load_artifact(folder)


def test_changed_encoder_is_refused(tiny_encoder_dir, tmp_path):
    encoder_dir = shutil.copytree(tiny_encoder_dir, tmp_path / "encoder")
    artifact = train_artifact(encoder_dir, tmp_path / "a", "cls")
    assert Classifier.load(artifact, device="cpu").encoder.revision == load_artifact(artifact).manifest.encoder_revision
    config = json.loads((encoder_dir / "config.json").read_text())
    (encoder_dir / "config.json").write_text(json.dumps(dict(config, dropout=0.2)))  # still loads fine
    with pytest.raises(UserError, match=r"refusing encoder .* \(the encoder changed\)"):
        Classifier.load(artifact, device="cpu")


def test_mismatched_head_is_refused(mean_artifact, tmp_path):
    folder = copy_of(mean_artifact, tmp_path / "a")
    (folder / JOBLIB_FILE).unlink()
    other = HeadWeights(np.ones(32), 0.0).to_bytes()  # a valid head, but not the one vouched for
    (folder / HEAD_FILE).write_bytes(other)
    with pytest.raises(UserError, match="head.safetensors: its sha256 .* does not match the manifest"):
        load_artifact(folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(json.dumps(dict(manifest, joblib_sha256=None, hidden_size=33,
                                                        head_sha256=hashlib.sha256(other).hexdigest())))
    with pytest.raises(UserError, match="a head of size 32, the manifest says 33"):
        load_artifact(folder)


def run_worker(artifact: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", PYTHONPATH=str(ROOT))
    env.pop("SENTIMENT_MODEL", None)
    return subprocess.run([sys.executable, "-m", "worker", "--model", str(artifact), "--metrics-port", "0",
                           "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_worker_refuses_unknown_pooling_changed_encoder_and_mismatched_head_in_one_line(tiny_encoder_dir,
                                                                                       tmp_path):
    encoder_dir = shutil.copytree(tiny_encoder_dir, tmp_path / "encoder")
    good = train_artifact(encoder_dir, tmp_path / "good", "mean")
    pooling = copy_of(good, tmp_path / "pooling")
    manifest = json.loads((good / MANIFEST_FILE).read_text())
    (pooling / MANIFEST_FILE).write_text(json.dumps(dict(manifest, pooling="max")))
    head = copy_of(good, tmp_path / "head")
    (head / HEAD_FILE).write_bytes(HeadWeights(np.ones(32), 0.0).to_bytes())
    (encoder_dir / "config.json").write_text((encoder_dir / "config.json").read_text() + "\n")
    for artifact, expected in ((pooling, "pooling 'max' is unknown"), (head, "does not match the manifest"),
                               (good, "the encoder changed")):
        result = run_worker(artifact)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and last.startswith("error:") and expected in last, result.stderr[-1500:]
        assert "Traceback" not in result.stderr


def test_format_1_is_refused_with_a_way_out_and_converts(tiny_artifact, tmp_path):
    """A format-1 artifact as the old code wrote it: manifest + pickled head.joblib, nothing else."""
    estimator = load_artifact(tiny_artifact).load_estimator()
    old = tmp_path / "old"
    old.mkdir()
    joblib.dump(estimator, old / JOBLIB_FILE)
    manifest = json.loads((tiny_artifact / MANIFEST_FILE).read_text())
    for key in ("joblib_sha256", "format_version", "encoder_revision"):
        manifest.pop(key)
    manifest.update(format_version=1, encoder_revision=None,
                    head_sha256=hashlib.sha256((old / JOBLIB_FILE).read_bytes()).hexdigest())
    (old / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"format 1 .* `python -m models convert --model .* or retrain it"):
        load_artifact(old)
    converted = convert_artifact(old)
    assert load_artifact(old).model_id == converted.model_id and (old / HEAD_FILE).is_file()
    assert converted.manifest.encoder_revision == load_artifact(tiny_artifact).manifest.encoder_revision
    np.testing.assert_allclose(Classifier.load(old, device="cpu", dtype="fp32").scores(TEXTS),
                               sklearn_scores(tiny_artifact, TEXTS), atol=1e-5)
    with pytest.raises(UserError, match="not a format-1 artifact"):
        convert_artifact(old)


def test_a_hub_commit_is_never_served_from_the_offline_package(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="unreachable"):
        Encoder._locate(OFFLINE_HUB_NAME, "0123456789abcdef0123456789abcdef01234567")
    if offline_folder() is not None:
        assert Encoder._locate(OFFLINE_HUB_NAME, None)[1] == "offline"
        assert Encoder._locate(OFFLINE_HUB_NAME, "sha256:" + "0" * 64)[1] == "offline"


def write_tsv(path: Path, n: int, seed: int) -> Path:
    texts, labels = labeled_sentences(n, seed=seed)
    path.write_text("".join(f"{t}\t{y}\n" for t, y in zip(texts, labels, strict=True)))
    return path


def test_feature_cache_is_keyed_by_pooling_and_data_and_serves_any_limit(tiny_encoder_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(models.features, "CHUNK_ROWS", 7)
    data = open_labeled(str(write_tsv(tmp_path / "a.tsv", 30, seed=3)))
    cls = Encoder.load(str(tiny_encoder_dir), device="cpu", dtype="fp32")
    cache = tmp_path / "cache"
    first = labeled_features(cls, data, 20, cache)
    assert (first.encoded_rows, first.cached_rows) == (21, 0) and first.x.shape == (20, cls.hidden_size)
    texts = [t for t, _ in data.rows()]
    np.testing.assert_allclose(first.x, cls.embed(texts)[:20], atol=1e-5)
    again = labeled_features(cls, data, 10, cache)
    assert (again.encoded_rows, again.cached_rows) == (0, 14)
    np.testing.assert_array_equal(again.x, first.x[:10])
    assert list(again.y) == [y for _, y in data.rows()][:10]
    everything = labeled_features(cls, data, None, cache)
    assert (everything.encoded_rows, everything.cached_rows) == (9, 21) and len(everything.y) == 30
    mean = Encoder.load(str(tiny_encoder_dir), device="cpu", dtype="fp32", pooling="mean")
    assert labeled_features(mean, data, 10, cache).encoded_rows == 14
    other = open_labeled(str(write_tsv(tmp_path / "b.tsv", 30, seed=4)))
    assert labeled_features(cls, other, 10, cache).encoded_rows == 14


def test_labeled_data_is_streamed(tmp_path):
    path = tmp_path / "big.tsv"
    path.write_text("good\t1\n" * 10 + "broken\tx\n")
    chunks = open_labeled(str(path)).chunks(4)
    assert next(chunks) == (["good"] * 4, [1] * 4)  # read before the bad line 11 is reached
    with pytest.raises(UserError, match="big.tsv:11"):
        list(chunks)


def test_second_train_reuses_the_cache(tiny_encoder_dir, tmp_path):
    data = write_tsv(tmp_path / "train.jsonl", 80, seed=2)
    data.write_text("".join(json.dumps({"text": line.split("\t")[0], "label": int(line.split("\t")[1])}) + "\n"
                            for line in data.read_text().splitlines()))

    def train(*extra: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "models", "train", "--data", str(data), "--out",
                               str(tmp_path / "a"), "--encoder", str(tiny_encoder_dir), "--dtype", "fp32",
                               "--pooling", "mean", "--cache-dir", str(tmp_path / "cache"), *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = train("--limit", "0")
    assert (first["encoded_rows"], first["cached_rows"]) == (80, 0)
    second = train("--limit", "60", "--c-grid", "0.5,2")
    assert (second["encoded_rows"], second["cached_rows"]) == (0, 80)
    assert second["n_train"] + second["n_test"] == 60 and second["best_C"] in (0.5, 2.0)
