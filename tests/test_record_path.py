"""Property-based: whatever a record's value, key or headers, the real Worker (over the fake Kafka of
tests/fakes.py, with the real tokenizer of a tiny encoder) turns it into exactly one result or one
dead letter, publishes only strict JSON in UTF-8, and classifies every valid review.

Each generated record carries the outcome its shape must have (DESIGN.md, "Messages"); an example
holds one record of every shape, shuffled over two partitions, plus a few more drawn at random.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract.records import DEFAULT_MAX_RECORD_BYTES, DLQ_VALUE_PREFIX_BYTES, LABELS
from tests.fakes import DLQ, IN, OUT, Harness
from worker.clients import TP

LABEL = "label"  # a result: positive or negative
NOT_UTF8 = (b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80")  # never valid UTF-8 anywhere
BLANKS = " \t\n\r\x00\x1f\x7f\u00a0\u2028\u3000\u200b\u200c\u200d\u200e\u202e\u2060\ufeff"
BOM = "\ufeff".encode()
HEADS = ["fine movie", "awful", "好看的电影", "😀 great", "r\u00e9ussi", "[1, 2", "42", "\"quoted\"", "\\udc00 literal"]
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400", "123456789e999"]


@dataclass
class Case:
    shape: str
    value: bytes | None
    expect: str  # LABEL or a dead-letter code
    id: str | None = None  # a result's id when not the default "<topic>:<partition>:<offset>"
    meta: Any = None  # a result's meta (None: no "meta" field)


# -- building blocks -----------------------------------------------------------------------------

text = st.text(max_size=30)  # any Unicode scalar value (no surrogates), controls and format characters too
ids = st.text(max_size=20)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
metas = st.dictionaries(st.text(max_size=8).filter(lambda k: k not in ("text", "id")), json_values, max_size=3)
visible = st.builds(lambda blank, head, tail: blank + head + tail,
                    st.text(alphabet=" \t\n", max_size=3), st.sampled_from(HEADS), text)
blank = st.text(alphabet=BLANKS, max_size=12)
ascii_escapes = st.booleans()


def dumps(obj: Any, ensure_ascii: bool) -> bytes:
    return json.dumps(obj, ensure_ascii=ensure_ascii).encode("utf-8")


def nest(value: Any, path: list[bool]) -> Any:
    """`value` buried in lists (True) and objects (False), innermost first."""
    for in_list in path:
        value = [value] if in_list else {"k": value}
    return value


@st.composite
def review_object(draw, text_value: Any = None, with_id: bool | None = None) -> tuple[dict, str | None, dict]:
    """A JSON review object in a drawn key order: (object, expected id, meta)."""
    text_value = draw(visible) if text_value is None else text_value
    meta = draw(metas)
    fields: dict[str, Any] = {"text": text_value, **meta}
    review_id = draw(ids) if (draw(st.booleans()) if with_id is None else with_id) else None
    if review_id is not None:
        fields["id"] = review_id
    order = draw(st.permutations(list(fields)))
    return {k: fields[k] for k in order}, review_id or None, meta


# -- shapes, each with its outcome ---------------------------------------------------------------


@st.composite
def plain_text(draw) -> Case:
    return Case("plain text", draw(visible).encode(), LABEL)


@st.composite
def json_review(draw) -> Case:
    obj, review_id, meta = draw(review_object())
    return Case("JSON review", dumps(obj, draw(ascii_escapes)), LABEL, review_id, meta or None)


@st.composite
def bom_review(draw) -> Case:
    if draw(st.booleans()):
        return Case("BOM + plain text", BOM + draw(visible).encode(), LABEL)
    obj, review_id, meta = draw(review_object())
    return Case("BOM + JSON review", BOM + dumps(obj, draw(ascii_escapes)), LABEL, review_id, meta or None)


@st.composite
def surrogate_pair(draw) -> Case:
    """An escaped surrogate PAIR is a valid character (😀): not to be confused with a lone one."""
    obj, review_id, meta = draw(review_object(text_value=draw(visible) + "\U0001f600" + draw(text)))
    return Case("escaped surrogate pair", dumps(obj, ensure_ascii=True), LABEL, review_id, meta or None)


@st.composite
def lone_surrogate(draw) -> Case:
    where = draw(st.sampled_from(["text", "id", "meta key", "meta value", "nested"]))
    lone = chr(draw(st.integers(0xD800, 0xDFFF)))
    before, after = draw(text), draw(text)
    if where == "text":
        obj = {"text": before + lone + after}
    elif where == "id":
        obj = {"text": draw(visible), "id": before + lone + after}
    elif where == "meta key":
        obj = {"text": draw(visible), before + lone + after: draw(json_values)}
    else:
        obj = {"text": draw(visible), "m": nest(before + lone + after, draw(st.lists(st.booleans(), max_size=6)))}
    return Case(f"lone surrogate escape in {where}", dumps(obj, ensure_ascii=True), "invalid_utf8")


@st.composite
def non_finite(draw) -> Case:
    where = draw(st.sampled_from(["text", "id", "meta", "nested"]))
    marker = "\x00MARK\x00"
    if where in ("text", "id"):
        obj = {"text": marker} if where == "text" else {"text": draw(visible), "id": marker}
    else:
        obj = {"text": draw(visible), "m": nest(marker, draw(st.lists(st.booleans(), max_size=6)))}
    literal = draw(st.sampled_from(NON_FINITE))
    value = json.dumps(obj).replace(json.dumps(marker), literal)
    return Case(f"{literal} in {where}", value.encode(), "invalid_json")


@st.composite
def bad_id(draw) -> Case:
    review_id = draw(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                     | st.lists(ids, max_size=2) | st.dictionaries(ids, ids, max_size=2))
    return Case("non-string id", dumps({"text": draw(visible), "id": review_id}, draw(ascii_escapes)), "bad_type")


@st.composite
def bad_text(draw) -> Case:
    value = draw(st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                 | st.lists(text, max_size=2) | st.dictionaries(ids, text, max_size=2))
    return Case("non-string text", dumps({"text": value, "id": draw(ids)}, draw(ascii_escapes)), "bad_type")


@st.composite
def null_text(draw) -> Case:
    return Case("null text", dumps({"text": None, **draw(metas)}, draw(ascii_escapes)), "empty_text")


@st.composite
def missing_text(draw) -> Case:
    obj = {draw(st.sampled_from(["Text", "body", "review", "texts"])): draw(visible), **draw(metas)}
    return Case("no text field", dumps(obj, draw(ascii_escapes)), "missing_text")


@st.composite
def blank_text(draw) -> Case:
    return Case("blank text field", dumps({"text": draw(blank), "id": draw(ids)}, draw(ascii_escapes)), "empty_text")


@st.composite
def blank_value(draw) -> Case:
    return Case("blank value", (BOM if draw(st.booleans()) else b"") + draw(blank).encode(), "empty_text")


null_value = st.just(Case("null value (tombstone)", None, "empty_text"))


@st.composite
def not_utf8(draw) -> Case:
    head, bad, tail = draw(st.binary(max_size=40)), draw(st.sampled_from(NOT_UTF8)), draw(st.binary(max_size=40))
    return Case("bytes that are not UTF-8", head + bad + tail, "invalid_utf8")


@st.composite
def truncated_multibyte(draw) -> Case:
    """Valid UTF-8 cut inside a character (a producer that split a buffer)."""
    obj, _, _ = draw(review_object())
    return Case("UTF-8 cut mid-character", dumps(obj, False) + "é€😀".encode()[: draw(st.sampled_from([1, 3, 6]))],
                "invalid_utf8")


@st.composite
def broken_json(draw) -> Case:
    obj, _, _ = draw(review_object())
    doc = json.dumps(obj, ensure_ascii=False)
    cut = draw(st.integers(1, len(doc) - 1))  # no proper prefix of an object is JSON
    return Case("JSON cut short", doc[:cut].encode(), "invalid_json")


@st.composite
def duplicate_keys(draw) -> Case:
    """The last of duplicate keys wins."""
    first = json.dumps(draw(json_values))
    good = draw(visible)
    review_id = draw(ids)
    value = f'{{"text": {first}, "id": {json.dumps(draw(json_values))}, "text": {json.dumps(good)}, ' \
            f'"id": {json.dumps(review_id)}}}'
    return Case("duplicate keys, the last valid", value.encode(), LABEL, review_id or None)


@st.composite
def deep_nesting(draw) -> Case:
    depth = draw(st.integers(20, 300))
    leaf = draw(scalars)
    path = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    meta = {"deep": nest(leaf, path)}
    return Case(f"nesting {depth} deep", dumps({"text": draw(visible), **meta}, True), LABEL, meta=meta)


@st.composite
def too_deep(draw) -> Case:
    depth = draw(st.integers(2_000, 60_000))  # under the byte cap
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    value = '{"text": "fine", "m": ' + opener * depth + "1" + closer * depth + "}"
    return Case(f"nesting {depth} deep", value.encode(), "invalid_json")


@st.composite
def huge_number(draw) -> Case:
    """Python refuses integers of over 4300 digits: not JSON it can read."""
    digits = "9" * draw(st.integers(4_301, 20_000))
    return Case("integer of over 4300 digits", b'{"text": "fine", "n": ' + digits.encode() + b"}", "invalid_json")


@st.composite
def huge_text(draw) -> Case:
    """Within the byte cap but far over the token limit: truncated and classified."""
    word = draw(st.sampled_from(["good ", "schlecht ", "好 ", "😀 ", "a"]))
    size = draw(st.integers(100_000, DEFAULT_MAX_RECORD_BYTES - 200))
    body = word * (size // len(word.encode()))
    if draw(st.booleans()):
        return Case("huge plain text", body.encode(), LABEL)
    return Case("huge JSON review", dumps({"text": body, "id": "huge"}, False), LABEL, "huge")


@st.composite
def over_the_cap(draw) -> Case:
    size = DEFAULT_MAX_RECORD_BYTES + draw(st.integers(1, 200_000))
    value = draw(st.sampled_from([b"x", b"\xff", b'{"text": "'])) * size
    return Case("over the byte cap", value[:size], "too_large")


SHAPES = [plain_text(), json_review(), bom_review(), surrogate_pair(), lone_surrogate(), non_finite(), bad_id(),
          bad_text(), null_text(), missing_text(), blank_text(), blank_value(), null_value, not_utf8(),
          truncated_multibyte(), broken_json(), duplicate_keys(), deep_nesting(), too_deep(), huge_number(),
          huge_text(), over_the_cap()]
keys = st.none() | st.binary(max_size=24)
headers = st.lists(st.tuples(st.text(max_size=10), st.none() | st.binary(max_size=16)), max_size=3)
records = st.tuples(*SHAPES).flatmap(lambda every: st.permutations(list(every))).flatmap(
    lambda every: st.lists(st.one_of(*SHAPES), max_size=6).map(lambda extra: every + extra))
placed = records.flatmap(lambda cases: st.tuples(
    st.just(cases), st.lists(st.tuples(st.integers(0, 1), keys, headers), min_size=len(cases), max_size=len(cases))))


# -- the property --------------------------------------------------------------------------------


def strict_json(raw: bytes) -> dict:
    """The value as UTF-8 and RFC 8259 JSON: no NaN/Infinity, no string a UTF-8 encoder refuses."""

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in a published value")

    body = json.loads(raw.decode("utf-8"), parse_constant=refuse)
    stack = [body]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            item.encode("utf-8")
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return body


@pytest.fixture(scope="module")
def tokenize(tiny_encoder_dir):
    from models.encoder import Encoder

    return Encoder.load(str(tiny_encoder_dir), device="cpu", dtype="fp32").tokenize


@settings(max_examples=30, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(placed=placed, guarantee=st.sampled_from(["at-least-once", "exactly-once"]),
       batch=st.integers(1, 16))
def test_every_record_ends_as_one_strict_json_output(tokenize, placed, guarantee, batch):
    cases, where = placed
    h = Harness(guarantee, tokenize=tokenize, max_batch_size=batch, max_in_flight=max(batch, 8))
    try:
        sent: dict[tuple[int, int], tuple[Case, bytes | None, list]] = {}
        for case, (partition, key, hdrs) in zip(cases, where, strict=True):
            offset = h.broker.append(IN, partition, key, case.value, hdrs)
            sent[(partition, offset)] = (case, key, hdrs)
        h.run_until_idle()  # raises if anything escaped the worker
        for partition in (0, 1):
            end = len(h.broker.logs[(IN, partition)])
            assert h.broker.committed.get(TP(IN, partition), 0) == end, "every record is committed"
        got: dict[tuple[int, int], list] = {}
        for topic in (OUT, DLQ):
            for msg in h.broker.logs[(topic, 0)]:
                body = strict_json(msg.value)
                source = body["source"]
                got.setdefault((source["partition"], source["offset"]), []).append((topic, msg, body))
        assert set(got) == set(sent), "every input has an output, and no output lacks an input"
        for (partition, offset), outs in got.items():
            case, key, hdrs = sent[(partition, offset)]
            where_ = f"{case.shape} at {partition}:{offset}"
            assert len(outs) == 1, f"{where_}: {len(outs)} outputs"
            [(topic, msg, body)] = outs
            assert msg.key == key and msg.headers == [(n, v or b"") for n, v in hdrs], where_
            assert body["source"] == {"topic": IN, "partition": partition, "offset": offset}
            outcome = LABEL if topic == OUT else body["error"]
            assert outcome == case.expect, f"{where_}: {outcome} ({body.get('detail')}), expected {case.expect}"
            if topic == OUT:
                assert body["label"] in LABELS and 0.0 <= body["score"] <= 1.0
                assert body["id"] == (case.id or f"{IN}:{partition}:{offset}"), where_
                assert body.get("meta") == case.meta, where_
            else:
                raw = case.value or b""
                assert base64.b64decode(body["value_b64"]) == raw[:DLQ_VALUE_PREFIX_BYTES], where_
                assert body["value_size"] == len(raw)
        huge = sum(case.shape.startswith("huge ") for case in cases)
        truncated = h.worker.metrics.registry.get_sample_value("sentiment_worker_messages_truncated_total")
        assert truncated >= huge
    finally:
        h.inference.close()
