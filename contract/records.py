"""The message schema of topics `reviews`, `reviews.classified` and `reviews.dlq` (see DESIGN.md).

One module owns the wire format: the producer encodes reviews with it, the worker decodes
them, writes results and dead letters with it, and tests read results back with it.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

INPUT_TOPIC = "reviews"
OUTPUT_TOPIC = "reviews.classified"
DLQ_TOPIC = "reviews.dlq"
DEFAULT_MAX_RECORD_BYTES = 512 * 1024
DLQ_VALUE_PREFIX_BYTES = 64 * 1024
LABELS = ("negative", "positive")

Headers = list[tuple[str, bytes]]


class DeadLetterCode(str, Enum):
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    MISSING_TEXT = "missing_text"
    EMPTY_TEXT = "empty_text"
    BAD_TYPE = "bad_type"
    TOO_LARGE = "too_large"


@dataclass(frozen=True)
class Source:
    topic: str
    partition: int
    offset: int

    def default_id(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"


@dataclass(frozen=True)
class Review:
    """A valid input record: what the model sees plus what travels to the result."""

    id: str
    text: str
    meta: dict[str, Any] | None


@dataclass(frozen=True)
class Rejection:
    """Why an input record cannot be classified."""

    code: DeadLetterCode
    detail: str


def decode_review(value: bytes | None, source: Source, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Review | Rejection:
    """Validate one input value: plain UTF-8 text, or a JSON object with a non-empty `text`."""
    if value is None:
        return Rejection(DeadLetterCode.EMPTY_TEXT, "null value (tombstone)")
    if len(value) > max_bytes:
        return Rejection(DeadLetterCode.TOO_LARGE, f"value is {len(value)} bytes, over the cap of {max_bytes}")
    try:
        decoded = value.decode("utf-8")
    except UnicodeDecodeError as err:
        return Rejection(DeadLetterCode.INVALID_UTF8, f"not UTF-8 at byte {err.start}")
    stripped = decoded.lstrip()
    if not stripped.startswith("{"):
        if not stripped:
            return Rejection(DeadLetterCode.EMPTY_TEXT, "value is blank")
        return Review(id=source.default_id(), text=decoded.strip(), meta=None)
    try:
        obj = json.loads(decoded)
    except (ValueError, RecursionError) as err:
        return Rejection(DeadLetterCode.INVALID_JSON, f"not a JSON object: {str(err)[:200]}")
    if not isinstance(obj, dict):
        return Rejection(DeadLetterCode.INVALID_JSON, "starts with '{' but is not a JSON object")
    if "text" not in obj:
        return Rejection(DeadLetterCode.MISSING_TEXT, "JSON object has no 'text' field")
    text = obj.pop("text")
    if text is None:
        return Rejection(DeadLetterCode.EMPTY_TEXT, "'text' is null")
    if not isinstance(text, str):
        return Rejection(DeadLetterCode.BAD_TYPE, f"'text' is a {type(text).__name__}, not a string")
    if not text.strip():
        return Rejection(DeadLetterCode.EMPTY_TEXT, "'text' is blank")
    raw_id = obj.pop("id", None)
    if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int))):
        return Rejection(DeadLetterCode.BAD_TYPE, f"'id' is a {type(raw_id).__name__}, not a string")
    review_id = str(raw_id) if raw_id is not None and str(raw_id) else source.default_id()
    return Review(id=review_id, text=text, meta=obj or None)


def encode_review(review_id: str, text: str, meta: dict[str, Any] | None = None) -> bytes:
    """The producer's input value."""
    body: dict[str, Any] = {"id": review_id, "text": text}
    if meta:
        body.update({k: v for k, v in meta.items() if k not in body})
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def label_of(score: float) -> str:
    return LABELS[score >= 0.5]


def encode_result(
    review: Review, score: float, model: str, source: Source, classified_at: float
) -> bytes:
    """A result value; `score` is P(positive)."""
    body: dict[str, Any] = {
        "id": review.id,
        "label": label_of(score),
        "score": round(float(score), 6),
        "model": model,
        "source": asdict(source),
        "classified_at": round(classified_at, 3),
    }
    if review.meta:
        body["meta"] = review.meta
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def encode_dead_letter(rejection: Rejection, value: bytes | None, source: Source) -> bytes:
    """A dead-letter value; oversized values keep only their first 64 KiB so it always fits the broker."""
    raw = value or b""
    kept = raw[:DLQ_VALUE_PREFIX_BYTES] if rejection.code is DeadLetterCode.TOO_LARGE else raw
    body = {
        "error": rejection.code.value,
        "detail": rejection.detail,
        "source": asdict(source),
        "value_b64": base64.b64encode(kept).decode("ascii"),
        "value_size": len(raw),
    }
    return json.dumps(body).encode("utf-8")
