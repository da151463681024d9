"""The message schema of topics `reviews`, `reviews.classified` and `reviews.dlq` (see DESIGN.md).

One module owns the wire format: the producer encodes reviews with it, the worker decodes
them, writes results and dead letters with it, and tests read results back with it.
"""

from __future__ import annotations

import base64
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple

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
    MODEL_ERROR = "model_error"
    OUTPUT_REJECTED = "output_rejected"
    INTERNAL_ERROR = "internal_error"


class Source(NamedTuple):  # named tuples: made for every record, they cost a third of a frozen dataclass
    topic: str
    partition: int
    offset: int

    def default_id(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"

    def as_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


class Review(NamedTuple):
    """A valid input record: what the model sees plus what travels to the result."""

    id: str
    text: str
    meta: dict[str, Any] | None


@dataclass(frozen=True)
class Rejection:
    """Why an input record cannot be classified."""

    code: DeadLetterCode
    detail: str


class _NotStrict(ValueError):
    """JSON that Python accepts but RFC 8259 does not (NaN, Infinity, numbers that overflow)."""


def _reject_constant(name: str) -> float:
    raise _NotStrict(f"{name} is not JSON (RFC 8259)")


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise _NotStrict(f"number {text[:40]} overflows a double")
    return number


# built once: json.loads/dumps with options build a new decoder/encoder on every call
_STRICT_JSON = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_RESULT_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False)
_string = json.encoder.encode_basestring  # how _RESULT_JSON writes a string (ensure_ascii=False)
_LONE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string in the decoded object (keys included) holds a surrogate that UTF-8 cannot carry."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def is_blank(text: str) -> bool:
    """Nothing but whitespace, control and invisible format characters (zero-width spaces, BOMs, bidi
    marks). Stops at the first visible character, so a real review costs next to nothing; one that starts
    with a letter or digit (most) costs no generator at all."""
    if text[:1].isalnum():
        return False
    return all(ch.isspace() or unicodedata.category(ch) in ("Cf", "Cc") for ch in text)


def decode_review(value: bytes | None, source: Source, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Review | Rejection:
    """Validate one input value: plain UTF-8 text, or a strict JSON object with a non-empty string `text`."""
    if value is None:
        return Rejection(DeadLetterCode.EMPTY_TEXT, "null value (tombstone)")
    if len(value) > max_bytes:
        return Rejection(DeadLetterCode.TOO_LARGE, f"value is {len(value)} bytes, over the cap of {max_bytes}")
    try:
        decoded = value.decode("utf-8")
    except UnicodeDecodeError as err:
        return Rejection(DeadLetterCode.INVALID_UTF8, f"not UTF-8 at byte {err.start}")
    decoded = decoded.removeprefix("\ufeff")
    stripped = decoded.lstrip()
    if not stripped.startswith("{"):
        if is_blank(stripped):
            return Rejection(DeadLetterCode.EMPTY_TEXT, "value is blank")
        return Review(id=source.default_id(), text=decoded.strip(), meta=None)
    try:
        obj = _STRICT_JSON.decode(decoded)
    except _NotStrict as err:
        return Rejection(DeadLetterCode.INVALID_JSON, str(err))
    except (ValueError, RecursionError) as err:
        return Rejection(DeadLetterCode.INVALID_JSON, f"not a JSON object: {str(err)[:200]}")
    if not isinstance(obj, dict):
        return Rejection(DeadLetterCode.INVALID_JSON, "starts with '{' but is not a JSON object")
    if _LONE_SURROGATE.search(decoded) and _has_lone_surrogate(obj):
        return Rejection(DeadLetterCode.INVALID_UTF8, "a JSON string escapes a lone surrogate (not encodable as UTF-8)")
    if "text" not in obj:
        return Rejection(DeadLetterCode.MISSING_TEXT, "JSON object has no 'text' field")
    text = obj.pop("text")
    if text is None:
        return Rejection(DeadLetterCode.EMPTY_TEXT, "'text' is null")
    if not isinstance(text, str):
        return Rejection(DeadLetterCode.BAD_TYPE, f"'text' is a {_json_type(text)}, not a string")
    if is_blank(text):
        return Rejection(DeadLetterCode.EMPTY_TEXT, "'text' is blank")
    raw_id = obj.pop("id", "")
    if not isinstance(raw_id, str):
        return Rejection(DeadLetterCode.BAD_TYPE, f"'id' is a {_json_type(raw_id)}, not a string")
    return Review(id=raw_id or source.default_id(), text=text, meta=obj or None)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def copy_headers(headers: Any) -> Headers:
    """Input headers as the producer takes them: a null value becomes an empty one."""
    if not headers:
        return []
    return [(str(key), b"" if value is None else bytes(value)) for key, value in headers]


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
    """A result value; `score` is P(positive). Written out directly: the bytes `_RESULT_JSON` writes for the
    same object, at half the cost (one is made for every record)."""
    rounded, at = round(float(score), 6), round(float(classified_at), 3)
    if not (math.isfinite(rounded) and math.isfinite(at)):
        raise ValueError(f"score {rounded} or time {at} is not a JSON number")
    text = (f'{{"id": {_string(review.id)}, "label": "{label_of(score)}", "score": {rounded!r}, '
            f'"model": {_string(model)}, "source": {{"topic": {_string(source.topic)}, '
            f'"partition": {int(source.partition)}, "offset": {int(source.offset)}}}, '
            f'"classified_at": {at!r}')
    if review.meta:
        text += ', "meta": ' + _RESULT_JSON.encode(review.meta)
    return (text + "}").encode("utf-8")


def encode_dead_letter(rejection: Rejection, value: bytes | None, source: Source,
                       keep_bytes: int = DLQ_VALUE_PREFIX_BYTES) -> bytes:
    """A dead-letter value; it keeps at most the first 64 KiB of the original, so it always fits the broker."""
    raw = value or b""
    kept = raw[:keep_bytes]
    body = {
        "error": rejection.code.value,
        "detail": rejection.detail.encode("utf-8", "replace").decode("utf-8")[:1000],
        "source": source.as_dict(),
        "value_b64": base64.b64encode(kept).decode("ascii"),
        "value_size": len(raw),
    }
    return json.dumps(body).encode("utf-8")
