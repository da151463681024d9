"""Reading reviews from files or stdin: tsv, csv, jsonl or plain text, with line-numbered errors.

The producer streams these rows (skipping bad ones); training and evaluation read labeled
rows from the same readers (and refuse bad ones).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.cli import UserError

FORMATS = ("tsv", "csv", "jsonl", "text")
EXTENSIONS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "text"}


@dataclass(frozen=True)
class ReviewRow:
    line: int
    text: str
    label: int | None = None
    id: str | None = None
    meta: dict[str, Any] | None = None


@dataclass(frozen=True)
class BadRow:
    line: int
    reason: str


def infer_format(path: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    if path == "-":
        return "text"
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSIONS:
        raise UserError(f"cannot tell the format of {path} from its extension; pass --format {'|'.join(FORMATS)}")
    return EXTENSIONS[suffix]


def parse_label(raw: Any) -> int | None:
    if raw is None or raw == "":
        return None
    if str(raw).strip() in ("0", "1"):
        return int(str(raw).strip())
    raise ValueError(f"label must be 0 or 1, got {raw!r}")


def _tsv(lines: Iterator[str]) -> Iterator[ReviewRow | BadRow]:
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        text, sep, label = line.rpartition("\t")
        if not sep:
            text, label = line, ""
        try:
            if not text.strip():
                raise ValueError("empty sentence")
            yield ReviewRow(n, text, parse_label(label))
        except ValueError as err:
            yield BadRow(n, str(err))


def _csv(lines: Iterator[str]) -> Iterator[ReviewRow | BadRow]:
    reader = csv.DictReader(lines)
    if not reader.fieldnames or "text" not in reader.fieldnames:
        yield BadRow(1, "csv needs a header with a 'text' column")
        return
    for row in reader:
        n = reader.line_num
        try:
            text = row.get("text")
            if not text or not text.strip():
                raise ValueError("empty text")
            if None in row:
                raise ValueError("more fields than the header")
            yield ReviewRow(n, text, parse_label(row.get("label")), row.get("id") or None)
        except ValueError as err:
            yield BadRow(n, str(err))


def _jsonl(lines: Iterator[str]) -> Iterator[ReviewRow | BadRow]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            text = obj.pop("text", None)
            if not isinstance(text, str) or not text.strip():
                raise ValueError("'text' missing, empty or not a string")
            label = parse_label(obj.pop("label", None))
            raw_id = obj.pop("id", None)
            yield ReviewRow(n, text, label, None if raw_id is None else str(raw_id), obj or None)
        except (ValueError, RecursionError) as err:
            yield BadRow(n, str(err)[:200])


def _text(lines: Iterator[str]) -> Iterator[ReviewRow | BadRow]:
    for n, line in enumerate(lines, 1):
        if line.strip():
            yield ReviewRow(n, line.strip())


READERS = {"tsv": _tsv, "csv": _csv, "jsonl": _jsonl, "text": _text}


def read_reviews(path: str, fmt: str | None = None) -> Iterator[ReviewRow | BadRow]:
    """Yield rows of a file (or stdin for '-'); undecodable lines come back as BadRow."""
    reader = READERS[infer_format(path, fmt)]
    if path == "-":
        stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace", newline="")
        yield from reader(iter(stream))
        return
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as handle:
            yield from reader(iter(handle))
    except FileNotFoundError:
        raise UserError(f"input file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"input is a directory, not a file: {path}") from None
