"""The model package with a tiny DistilBERT built here, loaded through from_pretrained."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from contract.cli import UserError
from models.artifact import HEAD_FILE, MANIFEST_FILE, check_encoder, load_artifact
from models.encoder import Encoder, resolve_dtype
from models.head import TorchHead
from tests.conftest import ROOT, labeled_sentences


@pytest.fixture(scope="module")
def encoder(tiny_encoder_dir):
    return Encoder.load(str(tiny_encoder_dir), device="cpu", dtype="fp32")


def test_tokenize_adds_specials_and_truncates_at_the_limit(encoder):
    tokens = encoder.tokenize(["great film", "word " * 500])
    cls_id, sep_id = encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id
    assert tokens.ids[0][0] == cls_id and tokens.ids[0][-1] == sep_id
    assert tokens.truncated == [False, True]
    assert tokens.lengths[1] == encoder.max_length == 128 and tokens.ids[1][-1] == sep_id


def test_cls_is_position_zero_and_padding_does_not_change_it(encoder):
    short, long = encoder.tokenize(["fine", "a much longer and slower review of a film"]).ids
    alone = encoder.cls([short])
    padded = encoder.cls([short, long])
    assert alone.shape == (1, encoder.hidden_size) and alone.dtype == torch.float32
    torch.testing.assert_close(alone[0], padded[0], atol=1e-5, rtol=1e-4)
    full = encoder.model(input_ids=torch.tensor([short])).last_hidden_state
    torch.testing.assert_close(alone[0], full[0, 0], atol=1e-5, rtol=1e-4)


def test_embed_keeps_input_order(encoder):
    texts = ["a long and winding review here", "short", "medium length one"]
    together = encoder.embed(texts, batch_size=2)
    one_by_one = np.stack([encoder.embed([t])[0] for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_torch_head_equals_sklearn_predict_proba(tiny_artifact, encoder):
    artifact = load_artifact(tiny_artifact)
    texts, _ = labeled_sentences(40, seed=1)
    features = encoder.embed(texts)
    expected = artifact.estimator.predict_proba(features)[:, 1]
    got = TorchHead(artifact.estimator, torch.device("cpu"))(torch.as_tensor(features)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_tampered_head_is_refused_before_unpickling(tiny_artifact, tmp_path):
    copy = tmp_path / "tampered"
    copy.mkdir()
    (copy / MANIFEST_FILE).write_text((tiny_artifact / MANIFEST_FILE).read_text())
    (copy / HEAD_FILE).write_bytes((tiny_artifact / HEAD_FILE).read_bytes() + b"\x00")
    with pytest.raises(UserError, match="does not match the manifest"):
        load_artifact(copy)


def test_missing_artifact_and_hidden_size_mismatch_are_clear(tiny_artifact, tmp_path):
    with pytest.raises(UserError, match="no model artifact"):
        load_artifact(tmp_path)
    with pytest.raises(UserError, match="hidden size"):
        check_encoder(load_artifact(tiny_artifact), 768)


def test_model_id_names_artifact_and_head_hash(tiny_artifact):
    artifact = load_artifact(tiny_artifact)
    manifest = json.loads((tiny_artifact / MANIFEST_FILE).read_text())
    assert artifact.model_id == f"tiny@{manifest['head_sha256'][:12]}"
    assert set(manifest["versions"]) == {"scikit-learn", "torch", "transformers"}


def test_dtype_auto_rules():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) in (torch.bfloat16, torch.float32)


def run_models(*args, env=None):
    return subprocess.run([sys.executable, "-m", "models", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def test_train_and_eval_cli_end_to_end(tiny_encoder_dir, tmp_path):
    texts, labels = labeled_sentences(80, seed=2)
    data = tmp_path / "train.tsv"
    data.write_text("".join(f"{t}\t{y}\n" for t, y in zip(texts, labels, strict=True)))
    out = tmp_path / "artifacts" / "cli"
    trained = run_models("train", "--data", str(data), "--out", str(out), "--encoder", str(tiny_encoder_dir),
                         "--limit", "0", "--dtype", "fp32", "--eval", str(data))
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert summary["n_train"] == 60 and 0 <= summary["eval_accuracy"] <= 1
    for quantize in ("none", "int8"):
        evaluated = run_models("eval", "--model", str(out), "--data", str(data), "--quantize", quantize,
                               "--device", "cpu")
        assert evaluated.returncode == 0, evaluated.stderr
        result = json.loads(evaluated.stdout.strip().splitlines()[-1])
        assert result["n"] == 80 and result["quantize"] == quantize and 0 <= result["accuracy"] <= 1


def test_cli_user_errors_are_one_line(tmp_path):
    missing = run_models("eval", "--model", str(tmp_path), "--data", "x.tsv")
    assert missing.returncode != 0 and missing.stderr.strip().startswith("error: no model artifact")
    assert "Traceback" not in missing.stderr
    bad = run_models("train", "--data", str(tmp_path / "nope.tsv"), "--out", str(tmp_path / "o"))
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "not found" in bad.stderr
