"""Input files -> documents: the three text modes, jsonl(.gz), parquet, and every bad input."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_bd3.data.sources import (
    InputError,
    InputRecord,
    SourceOptions,
    expand_inputs,
    iter_all_documents,
    iter_documents,
)


def read(path, **options) -> tuple[list[str], InputRecord]:
    record = InputRecord(path=str(path), format="?", bytes=0)
    return list(iter_documents(str(path), SourceOptions(**options), record)), record


TEXT = "First doc line one.\nline two.\n\n\n  \nSecond doc.\r\n\r\nThird\tdoc  \n"


def test_text_modes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbf" + TEXT.encode())  # with a UTF-8 byte-order mark
    docs, record = read(path, text_mode="paragraph")
    assert docs == ["First doc line one.\nline two.", "Second doc.", "Third\tdoc  "]
    assert record.documents == 3 and record.skipped.total() == 0
    docs, record = read(path, text_mode="line")
    assert docs == ["First doc line one.", "line two.", "Second doc.", "Third\tdoc  "]
    assert record.skipped.empty_documents == 4  # the blank lines of a one-document-per-line file
    docs, _ = read(path, text_mode="file")
    assert docs == ["First doc line one.\nline two.\n\n\n  \nSecond doc.\n\nThird\tdoc  "]


def test_empty_files_are_counted_not_fatal(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    (tmp_path / "real.txt").write_text("hello\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    records: list[InputRecord] = []
    paths = expand_inputs([str(tmp_path / "*.txt"), str(tmp_path / "empty.jsonl")])
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        "blank.txt",
        "empty.txt",
        "real.txt",
        "empty.jsonl",
    ]
    docs = list(iter_all_documents(paths, SourceOptions(), records))
    assert docs == ["hello"]
    assert [r.skipped.empty_files for r in records] == [1, 1, 0, 1]
    with pytest.raises(InputError, match="no documents in the inputs"):
        list(iter_all_documents(paths[:2], SourceOptions(), []))


def test_invalid_utf8_is_an_error_naming_file_and_line_or_a_counted_skip(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good one\n\nbad \xff\xfe line\nstill para two\n\nthird\n")
    with pytest.raises(
        InputError, match=r"bad\.txt:3: invalid UTF-8 \(byte 0xff at file offset 14"
    ):
        read(path)
    docs, record = read(path, on_bad_utf8="skip")
    assert docs == ["good one", "still para two", "third"]
    assert record.skipped.bad_utf8_lines == 1


def test_jsonl_and_gzip(tmp_path):
    rows = [{"text": "alpha"}, {"text": ""}, {"text": None}, {"text": "beta", "id": 3}]
    body = "".join(json.dumps(r) + "\n" for r in rows) + "\n"
    (tmp_path / "a.jsonl").write_text(body)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as handle:
        handle.write(body)
    for name in ("a.jsonl", "b.jsonl.gz"):
        docs, record = read(tmp_path / name)
        assert docs == ["alpha", "beta"]
        assert record.skipped.empty_documents == 2  # "" and null


def test_jsonl_errors(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n{"body": "b", "id": 1}\n')
    with pytest.raises(InputError, match=r"x\.jsonl:2: no field 'text' \(fields: body, id\)"):
        read(path)
    path.write_text('{"text": "a"}\n{"text": 5}\n')
    with pytest.raises(InputError, match=r"x\.jsonl:2: field 'text' is a int"):
        read(path)
    path.write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(InputError, match=r"x\.jsonl:2: invalid JSON"):
        read(path)
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n{"text": "c"}\n')
    with pytest.raises(InputError, match=r"x\.jsonl:2: invalid UTF-8"):
        read(path)
    docs, record = read(path, on_bad_utf8="skip")
    assert docs == ["a", "c"] and record.skipped.bad_utf8_records == 1


def test_truncated_gzip_is_an_error(tmp_path):
    data = gzip.compress(
        "".join(json.dumps({"text": f"doc {i} " * 50}) + "\n" for i in range(200)).encode()
    )
    (tmp_path / "t.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"t\.jsonl\.gz: the gzip stream is truncated or corrupt"):
        read(tmp_path / "t.jsonl.gz")


def test_parquet(tmp_path):
    table = pa.table({"content": ["one", None, "", "two"], "n": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "p.parquet")
    docs, record = read(tmp_path / "p.parquet", text_field="content")
    assert docs == ["one", "two"] and record.skipped.empty_documents == 2
    with pytest.raises(InputError, match=r"p\.parquet: no column 'text' \(columns: content, n\)"):
        read(tmp_path / "p.parquet")
    with pytest.raises(InputError, match=r"column 'n' has type int64, expected string"):
        read(tmp_path / "p.parquet", text_field="n")
    pq.write_table(
        pa.table({"text": pa.array([b"ok", b"\xff", b"fine"], pa.binary())}), tmp_path / "b.parquet"
    )
    with pytest.raises(InputError, match=r"b\.parquet: row 1, column 'text': invalid UTF-8"):
        read(tmp_path / "b.parquet")
    docs, record = read(tmp_path / "b.parquet", on_bad_utf8="skip")
    assert docs == ["ok", "fine"] and record.skipped.bad_utf8_records == 1
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match=r"junk\.parquet: not a readable parquet file"):
        read(tmp_path / "junk.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    docs, record = read(tmp_path / "e.parquet")
    assert docs == [] and record.skipped.empty_files == 1


def test_expand_inputs_errors(tmp_path):
    with pytest.raises(InputError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.txt")])
    with pytest.raises(InputError, match="no such file"):
        expand_inputs([str(tmp_path / "missing.txt")])
    with pytest.raises(InputError, match="no input given"):
        expand_inputs([])
    with pytest.raises(ValueError, match="text_mode 'words' is not one of"):
        SourceOptions(text_mode="words")
