"""The record decoder and the result / dead-letter encoders (DESIGN.md, Messages)."""

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contract.records import (
    DLQ_VALUE_PREFIX_BYTES,
    DeadLetterCode,
    Rejection,
    Review,
    Source,
    decode_review,
    encode_dead_letter,
    encode_result,
    encode_review,
    is_blank,
)

SRC = Source("reviews", 3, 41)


def code(value, max_bytes=512 * 1024):
    result = decode_review(value, SRC, max_bytes)
    return result.code if isinstance(result, Rejection) else None


def test_plain_text_is_the_review_with_default_id():
    review = decode_review(b"  a fine film \n", SRC)
    assert review == Review(id="reviews:3:41", text="a fine film", meta=None)


def test_json_object_keeps_id_and_carries_other_fields_as_meta():
    review = decode_review(b'{"id": "r1", "text": "great", "stars": 5, "lang": "en"}', SRC)
    assert review == Review(id="r1", text="great", meta={"stars": 5, "lang": "en"})


def test_json_without_id_gets_default_id():
    assert decode_review(b'{"text": "ok"}', SRC).id == "reviews:3:41"


def test_malformed_values_get_their_codes():
    assert code(b"\xff\xfe bad") is DeadLetterCode.INVALID_UTF8
    assert code(b'{"text": "unterminated') is DeadLetterCode.INVALID_JSON
    assert code(b'{"body": "no text"}') is DeadLetterCode.MISSING_TEXT
    assert code(b'{"text": "   "}') is DeadLetterCode.EMPTY_TEXT
    assert code(b'{"text": null}') is DeadLetterCode.EMPTY_TEXT
    assert code(None) is DeadLetterCode.EMPTY_TEXT
    assert code(b"   \n\t") is DeadLetterCode.EMPTY_TEXT
    assert code(b'{"text": 42}') is DeadLetterCode.BAD_TYPE
    assert code(b'{"text": ["a"]}') is DeadLetterCode.BAD_TYPE
    assert code(b"x" * 101, max_bytes=100) is DeadLetterCode.TOO_LARGE
    assert code(b"[" * 100_000 + b"]" * 100_000) is None  # not starting with '{': plain text
    assert code(b"{" + b'"a":[' * 50_000 + b"1" + b"]" * 50_000 + b"}") is DeadLetterCode.INVALID_JSON


def test_dead_letter_of_oversized_value_keeps_only_a_prefix():
    value = b"y" * (DLQ_VALUE_PREFIX_BYTES * 3)
    body = json.loads(encode_dead_letter(Rejection(DeadLetterCode.TOO_LARGE, "big"), value, SRC))
    assert body["error"] == "too_large" and body["value_size"] == len(value)
    assert base64.b64decode(body["value_b64"]) == value[:DLQ_VALUE_PREFIX_BYTES]
    assert body["source"] == {"topic": "reviews", "partition": 3, "offset": 41}


def test_result_schema():
    body = json.loads(encode_result(Review("r1", "t", {"k": 1}), 0.8125, "tiny@abc", SRC, 1700000000.123456))
    assert body == {"id": "r1", "label": "positive", "score": 0.8125, "model": "tiny@abc",
                    "source": {"topic": "reviews", "partition": 3, "offset": 41},
                    "classified_at": 1700000000.123, "meta": {"k": 1}}
    assert json.loads(encode_result(Review("r2", "t", None), 0.2, "m", SRC, 1.0))["label"] == "negative"


@given(st.text(), st.floats(0, 1), st.text(min_size=1), st.text(min_size=1), st.integers(0, 10**6),
       st.integers(0, 2**63 - 1), st.floats(0, 4e9),
       st.none() | st.dictionaries(st.text(), st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                                   | st.text() | st.lists(st.booleans() | st.none()), max_size=3))
def test_a_result_is_written_as_the_json_encoder_writes_it(review_id, score, model, topic, partition, offset, at, meta):
    """encode_result writes its JSON directly (speed): byte for byte what json.dumps writes for the object."""
    body = {"id": review_id, "label": "positive" if score >= 0.5 else "negative", "score": round(score, 6),
            "model": model, "source": {"topic": topic, "partition": partition, "offset": offset},
            "classified_at": round(at, 3)}
    if meta:
        body["meta"] = meta
    written = encode_result(Review(review_id, "t", meta), score, model, Source(topic, partition, offset), at)
    assert written == json.dumps(body, ensure_ascii=False).encode("utf-8")


def test_a_score_or_time_that_is_not_a_json_number_cannot_be_written():
    for score, at in ((float("nan"), 1.0), (float("inf"), 1.0), (0.5, float("inf"))):
        with pytest.raises(ValueError, match="not a JSON number"):
            encode_result(Review("r", "t", None), score, "m", SRC, at)


@given(st.text(min_size=1), st.text(min_size=1), st.dictionaries(st.text().filter(lambda k: k not in ("id", "text")),
                                                                    st.integers() | st.text(), max_size=3))
def test_encode_then_decode_round_trips(review_id, text, meta):
    decoded = decode_review(encode_review(review_id, text, meta), SRC)
    if not is_blank(text):  # whitespace, control and invisible format characters only: blank
        assert decoded == Review(review_id, text, meta or None)
    else:
        assert decoded.code is DeadLetterCode.EMPTY_TEXT


@given(st.binary(max_size=2000) | st.none())
def test_decoder_never_raises_and_always_decides(value):
    decoded = decode_review(value, SRC, max_bytes=1000)
    assert isinstance(decoded, (Review, Rejection))
    if isinstance(decoded, Review):
        assert decoded.text.strip() and decoded.id


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3)))
def test_any_json_value_is_classified_or_dead_lettered(obj):
    decoded = decode_review(json.dumps({"text": obj}).encode(), SRC)
    if isinstance(obj, str) and not is_blank(obj):
        assert decoded == Review("reviews:3:41", obj, None)
    else:
        assert isinstance(decoded, Rejection)
