"""A mean-pooled artifact served by the worker through a real broker: its scores are those of
`models eval` and of the Python API, and the worker serves it with unpickling made impossible."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from models.artifact import load_artifact
from models.classifier import Classifier
from models.encoder import Encoder
from ops.harness import WorkerProcess, publish, read
from tests.conftest import ROOT, labeled_sentences

NO_PICKLE = '''"""Loaded at start-up (PYTHONPATH): unpickling anything in this process raises."""
import os
import pickle

import joblib


def _refuse(*_args, **_kwargs):
    raise RuntimeError("unpickling is forbidden in this process")


pickle.load = pickle.loads = joblib.load = _refuse
open(os.environ["NO_PICKLE_MARKER"], "w").close()
'''


def models_cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "models", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_mean_pooled_model_scores_alike_in_worker_eval_and_python_api(tiny_encoder_dir, topics, env,
                                                                       kafka_settings, tmp_path):
    texts, labels = labeled_sentences(120, seed=5)
    texts = [t + " , really" * (i % 9) for i, t in enumerate(texts)]  # lengths vary: batches mix lengths
    data = tmp_path / "reviews.tsv"
    data.write_text("".join(f"{t}\t{y}\n" for t, y in zip(texts, labels, strict=True)))
    artifact = tmp_path / "artifacts" / "tiny-mean"
    models_cli("train", "--data", str(data), "--out", str(artifact), "--encoder", str(tiny_encoder_dir),
               "--pooling", "mean", "--limit", "0", "--dtype", "fp32", "--no-cache")
    loaded = load_artifact(artifact)
    assert loaded.manifest.pooling == "mean"

    models_cli("eval", "--model", str(artifact), "--data", str(data), "--device", "cpu", "--dtype", "fp32",
               "--predictions", str(tmp_path / "eval.jsonl"))
    evaluated = np.array([json.loads(line)["score"] for line in (tmp_path / "eval.jsonl").read_text().splitlines()])
    api = Classifier.load(artifact, device="cpu", dtype="fp32")
    predicted = api.predict(texts)

    topics.create(partitions=2)
    values = [json.dumps({"id": f"e{i}", "text": t}).encode() for i, t in enumerate(texts)]
    publish(kafka_settings, topics.input, values)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(NO_PICKLE)
    marker = tmp_path / "no-pickle-was-loaded"
    guarded = dict(env, PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{env['PYTHONPATH']}", NO_PICKLE_MARKER=str(marker))
    with WorkerProcess(artifact, topics, "--device", "cpu", "--dtype", "fp32", "--max-batch-size", "16",
                       env=guarded, log=tmp_path / "w.log") as worker:
        results = [json.loads(r.value) for r in read(kafka_settings, topics.output, len(texts), timeout=120)]
        assert worker.alive(), worker.tail()
    assert marker.exists(), "the worker ran without the unpickling guard"
    assert len(results) == len(texts)
    served = np.array([b["score"] for b in sorted(results, key=lambda b: int(b["id"][1:]))])
    assert {b["model"] for b in results} == {loaded.model_id}

    np.testing.assert_allclose(served, evaluated, atol=1e-5)
    np.testing.assert_allclose(served, [p.score for p in predicted], atol=1e-5)
    by_id = {b["id"]: b["label"] for b in results}
    clear = [i for i, p in enumerate(predicted) if abs(p.score - 0.5) > 1e-4]
    assert [by_id[f"e{i}"] for i in clear] == [predicted[i].label for i in clear]
    cls = Classifier(Encoder.load(str(tiny_encoder_dir), device="cpu", dtype="fp32", pooling="cls"), api.head)
    assert np.abs(cls.scores(texts) - served).max() > 1e-3, "served scores must be the mean-pooled ones"
