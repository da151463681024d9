"""Review file readers: tsv, csv, jsonl, text, with bad rows reported by line number."""

import pytest

from contract.cli import UserError
from contract.review_files import BadRow, ReviewRow, infer_format, read_reviews
from models.datasets import open_labeled


def rows(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    return list(read_reviews(str(path)))


def test_tsv_rows_and_bad_label(tmp_path):
    got = rows(tmp_path, "a.tsv", "good film\t1\nbad film\t0\nno idea\tmaybe\n")
    assert got[:2] == [ReviewRow(1, "good film", 1), ReviewRow(2, "bad film", 0)]
    assert isinstance(got[2], BadRow) and got[2].line == 3


def test_csv_needs_text_header_and_reports_lines(tmp_path):
    got = rows(tmp_path, "a.csv", "id,text,label\nx1,\"fine, really\",1\nx2,,0\n")
    assert got[0] == ReviewRow(2, "fine, really", 1, "x1")
    assert isinstance(got[1], BadRow) and got[1].line == 3
    assert isinstance(rows(tmp_path, "b.csv", "body,label\nx,1\n")[0], BadRow)


def test_jsonl_meta_and_bad_lines(tmp_path):
    got = rows(tmp_path, "a.jsonl", '{"text": "ok", "label": 1, "id": 7, "src": "web"}\n{broken\n{"label": 1}\n')
    assert got[0] == ReviewRow(1, "ok", 1, "7", {"src": "web"})
    assert [type(r) for r in got[1:]] == [BadRow, BadRow] and [r.line for r in got[1:]] == [2, 3]


def test_format_from_extension_or_flag():
    assert infer_format("x.tsv", None) == "tsv" and infer_format("x.data", "csv") == "csv"
    with pytest.raises(UserError, match="--format"):
        infer_format("x.data", None)


def test_training_data_refuses_malformed_rows_with_line_number(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("good\t1\nbad\t0\nugly\tx\n")
    with pytest.raises(UserError, match=r"train.tsv:3"):
        list(open_labeled(str(path)).rows())
    assert list(open_labeled(str(path)).rows(limit=2)) == [("good", 1), ("bad", 0)]


def test_sst2_reads_sst2_dir(tmp_path, monkeypatch):
    (tmp_path / "train.tsv").write_text("fine\t1\nawful\t0\n")
    monkeypatch.setenv("SST2_DIR", str(tmp_path))
    data = open_labeled("sst2")
    assert list(data.rows()) == [("fine", 1), ("awful", 0)] and len(data.sha256) == 64
