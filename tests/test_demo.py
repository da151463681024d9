"""`make demo` scores only reviews its head was not trained on, and says which."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from contract.review_files import ReviewRow, read_reviews
from models.checksums import sha256_file
from ops.demo import OWN_REVIEWS, honest, plan_reviews, summarize


def own_plan(monkeypatch, tmp_path):
    monkeypatch.setenv("SST2_DIR", str(tmp_path))  # holds no SST-2: the demo falls back to its own reviews
    return plan_reviews()


def test_own_reviews_hold_a_quarter_of_each_label_out_of_training(monkeypatch, tmp_path):
    plan = own_plan(monkeypatch, tmp_path)
    rows = [r for r in read_reviews(str(OWN_REVIEWS)) if isinstance(r, ReviewRow)]
    trained = Path(plan.train_data).read_text().splitlines()
    held = [r for r in rows if r.line in plan.held_out]
    assert Counter(r.label for r in held) == {0: 5, 1: 5} and len(trained) == len(rows) - len(held)
    assert not {f"{r.text}\t{r.label}" for r in held} & set(trained)
    assert plan.stream == OWN_REVIEWS and "other 30 of the project's 40" in plan.what


def test_no_score_for_an_artifact_trained_on_other_data(monkeypatch, tmp_path):
    plan = own_plan(monkeypatch, tmp_path)
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "manifest.json").write_text(json.dumps({"data_sha256": "0" * 64}))
    assert "trained on other data" in honest(plan, artifact)
    (artifact / "manifest.json").write_text(json.dumps({"data_sha256": sha256_file(Path(plan.train_data))}))
    assert honest(plan, artifact) is None


def result(i: int, label: str, truth: int, held_out: bool) -> SimpleNamespace:
    return SimpleNamespace(value=json.dumps({"id": f"r{i}", "label": label, "model": "m@1", "classified_at": 1.0,
                                             "meta": {"label": truth, "held_out": held_out}}))


def test_summary_counts_held_out_reviews_only(capsys):
    records = [result(0, "positive", 1, True), result(1, "negative", 1, True), result(2, "positive", 0, False)]
    summarize(records, [], {}, 1.0, 9108, "", "they were held out", {"encoder": "e", "pooling": "mean"})
    out = capsys.readouterr().out
    assert "accuracy            0.500 on 2 held-out reviews (they were held out)" in out
    assert "e, mean pooling" in out
    summarize(records[2:], [], {}, 1.0, 9108, "", "trained on other data", {})
    assert "no held-out score (trained on other data)" in capsys.readouterr().out
