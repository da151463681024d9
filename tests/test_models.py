"""The model package with a tiny DistilBERT built here, loaded through from_pretrained."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from contract.cli import UserError
from models.artifact import HEAD_FILE, JOBLIB_FILE, MANIFEST_FILE, load_artifact
from models.classifier import Classifier
from models.encoder import KERNEL_CACHE_ENV, Encoder, length_batches, resolve_dtype
from models.head import HeadWeights, TorchHead
from tests.conftest import ROOT, labeled_sentences


@pytest.fixture(scope="module")
def encoder(tiny_encoder_dir):
    return Encoder.load(str(tiny_encoder_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def mean_encoder(tiny_encoder_dir):
    return Encoder.load(str(tiny_encoder_dir), device="cpu", dtype="fp32", pooling="mean")


def test_tokenize_adds_specials_and_truncates_at_the_limit(encoder):
    tokens = encoder.tokenize(["great film", "word " * 500])
    cls_id, sep_id = encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id
    assert tokens.ids[0][0] == cls_id and tokens.ids[0][-1] == sep_id
    assert tokens.truncated == [False, True]
    assert tokens.lengths[1] == encoder.max_length == 128 and tokens.ids[1][-1] == sep_id


def test_tokenizing_through_the_rust_core_gives_what_transformers_gives(encoder):
    """The worker calls the fast tokenizer's core directly (speed); ids and truncation must not change."""
    texts = ["great film", "word " * 500, "caf\u00e9 \U0001F600 d\u00e9j\u00e0 vu", "x" * 3000, "  spaced  out  ",
             *labeled_sentences(40)[0]]
    direct = encoder.tokenize(texts)
    core, encoder._core = encoder._core, None
    try:
        through_transformers = encoder.tokenize(texts)
    finally:
        encoder._core = core
    assert core is not None
    assert direct.ids == through_transformers.ids and direct.truncated == through_transformers.truncated


def test_cls_features_are_position_zero_and_padding_does_not_change_them(encoder):
    short, long = encoder.tokenize(["fine", "a much longer and slower review of a film"]).ids
    alone = encoder.features([short])
    padded = encoder.features([short, long])
    assert alone.shape == (1, encoder.hidden_size) and alone.dtype == torch.float32
    torch.testing.assert_close(alone[0], padded[0], atol=1e-5, rtol=1e-4)
    full = encoder.model(input_ids=torch.tensor([short])).last_hidden_state
    torch.testing.assert_close(alone[0], full[0, 0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_a_traced_encoder_gives_eager_features_on_every_shape(tiny_encoder_dir, pooling):
    """The worker runs the encoder as a TorchScript trace (no GIL between its operations): traced on one shape,
    it must give eager's features for other row counts and lengths, padding included."""
    eager = Encoder.load(str(tiny_encoder_dir), device="cpu", dtype="fp32", pooling=pooling)
    traced = Encoder.load(str(tiny_encoder_dir), device="cpu", dtype="fp32", pooling=pooling)
    assert traced.trace() and traced.graph == "torchscript" and eager.graph == "eager"
    texts, _ = labeled_sentences(40)
    ids = traced.tokenize(["x", *texts, "word " * 500]).ids
    for batch in ([ids[0]], ids[1:4], ids[4:37], [ids[-1], ids[0]], ids):
        torch.testing.assert_close(traced.features(batch), eager.features(batch), atol=1e-5, rtol=1e-4)


def test_an_encoder_that_does_not_trace_or_traces_wrong_runs_eagerly(encoder, monkeypatch, caplog):
    ids = encoder.tokenize(["fine", "a much longer and slower review of a film"]).ids
    expected = encoder.features(ids)

    def fails(*_args, **_kwargs):
        raise RuntimeError("cannot trace this model\nmore detail")

    class Wrong(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return torch.zeros(*input_ids.shape, encoder.hidden_size)

    for trace, said in ((fails, "does not trace (RuntimeError: cannot trace this model)"),
                        (lambda *_a, **_k: Wrong(), "traces to other outputs")):
        monkeypatch.setattr(torch.jit, "trace", trace)
        caplog.clear()
        assert not encoder.trace()
        assert encoder.graph == "eager" and said in caplog.text
        torch.testing.assert_close(encoder.features(ids), expected)


def test_mean_features_average_the_real_tokens_only(mean_encoder):
    short, long = mean_encoder.tokenize(["fine", "a much longer and slower review of a film"]).ids
    alone = mean_encoder.features([short])
    padded = mean_encoder.features([short, long])
    torch.testing.assert_close(alone[0], padded[0], atol=1e-5, rtol=1e-4)
    full = mean_encoder.model(input_ids=torch.tensor([short])).last_hidden_state
    torch.testing.assert_close(alone[0], full[0].mean(dim=0), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(alone[0], full[0, 0], atol=1e-3), "mean pooling must differ from [CLS]"


def test_unknown_pooling_is_refused(tiny_encoder_dir):
    with pytest.raises(UserError, match="unknown pooling 'max'"):
        Encoder.load(str(tiny_encoder_dir), device="cpu", dtype="fp32", pooling="max")


def test_embed_keeps_input_order(encoder):
    texts = ["a long and winding review here", "short", "medium length one"]
    together = encoder.embed(texts, max_rows=2)
    one_by_one = np.stack([encoder.embed([t])[0] for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_length_batches_sort_and_respect_both_caps():
    lengths = [5, 50, 3, 40, 4, 45, 6]
    batches = length_batches(lengths, max_rows=3, max_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= 100 for b in batches)
    assert batches[0] == [2, 4, 0]  # the shortest rows together


def test_torch_head_equals_sklearn_predict_proba(tiny_artifact, encoder):
    artifact = load_artifact(tiny_artifact)
    texts, _ = labeled_sentences(40, seed=1)
    features = encoder.embed(texts)
    expected = artifact.load_estimator().predict_proba(features)[:, 1]
    got = TorchHead(artifact.head, torch.device("cpu"))(torch.as_tensor(features)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_head_safetensors_holds_only_the_weights(tiny_artifact):
    head = HeadWeights.from_bytes((tiny_artifact / HEAD_FILE).read_bytes(), HEAD_FILE)
    np.testing.assert_array_equal(head.weight, load_artifact(tiny_artifact).load_estimator().coef_[0])
    with pytest.raises(UserError, match="not a readable safetensors"):
        HeadWeights.from_bytes(b"\x80\x04K\x01.", "pickle-bytes")


@pytest.mark.parametrize("name", [HEAD_FILE, JOBLIB_FILE])
def test_tampered_files_are_refused_before_reading(tiny_artifact, tmp_path, name):
    copy = tmp_path / "tampered"
    copy.mkdir()
    for file in (MANIFEST_FILE, HEAD_FILE, JOBLIB_FILE):
        (copy / file).write_bytes((tiny_artifact / file).read_bytes())
    (copy / name).write_bytes((tiny_artifact / name).read_bytes() + b"\x00")
    with pytest.raises(UserError, match=f"{name}: its sha256 .* does not match the manifest"):
        load_artifact(copy)


def test_missing_artifact_and_hidden_size_mismatch_are_clear(tiny_artifact, tmp_path, encoder):
    with pytest.raises(UserError, match="no model artifact"):
        load_artifact(tmp_path)
    with pytest.raises(UserError, match="hidden size 32 does not match the head's 768"):
        Classifier(encoder, TorchHead(HeadWeights(np.zeros(768), 0.0), torch.device("cpu")))


def test_model_id_names_artifact_and_safetensors_hash(tiny_artifact):
    artifact = load_artifact(tiny_artifact)
    manifest = json.loads((tiny_artifact / MANIFEST_FILE).read_text())
    assert artifact.model_id == f"tiny@{manifest['head_sha256'][:12]}"
    assert set(manifest["versions"]) == {"scikit-learn", "torch", "transformers"}
    assert manifest["format_version"] == 2 and manifest["encoder_revision"].startswith("sha256:")


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
                         "--limit", "0", "--dtype", "fp32", "--eval", str(data), "--no-cache")
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert summary["n_train"] == 60 and 0 <= summary["eval_accuracy"] <= 1 and summary["pooling"] == "cls"
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


def test_a_random_distilbert_built_on_a_vocabulary_file_uses_all_of_it(tmp_path):
    """Benchmarks build their random DistilBERT on the uncased vocabulary, so that token counts are real ones
    (transformers 5 ignores `vocab_file=`: every word became [UNK])."""
    from models.build import SPECIAL, save_random_distilbert

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL, "good", "film", "##s"]) + "\n")
    folder = save_random_distilbert(tmp_path / "model", vocab_file=vocab, tiny=True)
    encoder = Encoder.load(str(folder), device="cpu", dtype="fp32")
    assert len(encoder.tokenizer) == 8 and encoder.model.config.vocab_size == 8
    assert encoder.tokenize(["Good FILMS"]).ids == [[2, 5, 6, 7, 3]]


KERNEL_CACHE_PROBE = """
import random, sys, psutil
from models.encoder import Encoder
encoder = Encoder.load(sys.argv[1], device="cpu", dtype="fp32")
process, shapes = psutil.Process(), [(rows, length) for rows in range(1, 61, 2) for length in range(4, 124, 3)]
random.Random(0).shuffle(shapes)
for rows, length in shapes[:40]:
    encoder.features([[7] * length] * rows)
before = process.memory_info().rss
for rows, length in shapes[40:]:
    encoder.features([[7] * length] * rows)
print((process.memory_info().rss - before) / 2**20)
"""


def test_the_cpu_kernel_cache_stays_small_over_many_batch_shapes(tiny_encoder_dir):
    """oneDNN keeps a compiled kernel per shape; at its default of 1024 a worker's memory grew for minutes."""
    def growth_mib(**env: str) -> float:
        clean = {k: v for k, v in os.environ.items() if k != KERNEL_CACHE_ENV}
        done = subprocess.run([sys.executable, "-c", KERNEL_CACHE_PROBE, str(tiny_encoder_dir)], env=clean | env,
                              capture_output=True, text=True, check=True)
        return float(done.stdout.split()[-1])

    bounded, default = growth_mib(), growth_mib(**{KERNEL_CACHE_ENV: "1024"})
    assert bounded < 0.5 * default, (bounded, default)
