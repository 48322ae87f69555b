"""Reading corpora: every format and compression, byte ranges, and every kind of bad input.

Pure functions on tiny files written by the test: tasks/preprocess/sources.py and tasks/preprocess/documents.py.
"""

import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.preprocess.documents import DocRules, Tally, doc_hash, is_val, read_documents
from tasks.preprocess.sources import Piece, file_format, is_splittable
from tokenmill.errors import TokenmillError

from preprocess_helpers import write


def read_all(path, rules: DocRules | None = None) -> tuple[list[str], Tally]:
    rules, tally = rules or DocRules(), Tally()
    return list(read_documents(path if isinstance(path, Piece) else str(path), rules, tally)), tally


def parquet(path: Path, **columns) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=2)
    return path


# --- formats and compression ---------------------------------------------------------------

TEXT = "first para line 1\nline 2\n\n\nsecond para\n\nthird café\n"


@pytest.mark.parametrize("ext", ["", ".gz", ".bz2", ".zst"])
@pytest.mark.parametrize(
    "fmt, expected",
    [
        ("text", [TEXT]),
        ("lines", ["first para line 1", "line 2", "second para", "third café"]),
        ("paragraphs", ["first para line 1\nline 2", "second para", "third café"]),
    ],
)
def test_text_formats_under_every_compression(tmp_path, ext, fmt, expected):
    path = write(tmp_path / f"doc.txt{ext}", TEXT)
    docs, tally = read_all(path, DocRules(format=fmt))
    assert docs == expected
    assert tally.counts["files"] == 1


@pytest.mark.parametrize("ext", ["", ".gz", ".bz2", ".zst"])
def test_jsonl_under_every_compression_reads_the_configured_field(tmp_path, ext):
    lines = [{"body": "one", "text": "ignored"}, {"body": "two\nlines"}, {"body": "three"}]
    path = write(tmp_path / f"d.jsonl{ext}", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    docs, tally = read_all(path, DocRules(format="jsonl", text_field="body"))
    assert docs == ["one", "two\nlines", "three"]
    assert tally.counts["docs_in"] == 3  # the blank line is not a record


def test_parquet_reads_the_configured_column_across_row_groups(tmp_path):
    path = parquet(tmp_path / "d.parquet", id=[1, 2, 3, 4, 5], content=["a", "bb", None, "dddd", "e"])
    docs, tally = read_all(path, DocRules(format="parquet", text_field="content"))
    assert docs == ["a", "bb", "dddd", "e"]
    assert tally.counts["dropped_missing_field"] == 1
    assert tally.first["dropped_missing_field"] == f"{path}:row 3"


def test_auto_format_goes_by_extension_under_compression():
    assert file_format("a/b.jsonl.gz", "auto") == "jsonl"
    assert file_format("b.NDJSON", "auto") == "jsonl"
    assert file_format("c.parquet", "auto") == "parquet"
    assert file_format("d.py.zst", "auto") == "text"
    assert file_format("d.jsonl", "lines") == "lines"  # a declared format wins


def test_crlf_line_endings_are_not_part_of_lines(tmp_path):
    path = write(tmp_path / "w.txt", b"one\r\ntwo\r\n\r\nthree")
    assert read_all(path, DocRules(format="lines"))[0] == ["one", "two", "three"]
    assert read_all(path, DocRules(format="paragraphs"))[0] == ["one\r\ntwo", "three"]


def test_documents_are_read_from_fsspec_urls(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/a.jsonl.gz", __import__("gzip").compress(b'{"text": "from memory"}\n'))
    docs, _ = read_all("memory:///corpus/a.jsonl.gz", DocRules(format="auto"))
    assert docs == ["from memory"]


# --- normalization, filters, hashes --------------------------------------------------------


def test_normalization_per_setting(tmp_path):
    path = write(tmp_path / "a.txt", "cafe\u0301 \u212b ﬁ")  # decomposed é, angstrom sign, fi ligature
    assert read_all(path)[0] == ["caf\u00e9 \u00c5 ﬁ"]
    assert read_all(path, DocRules(normalize="none"))[0] == ["cafe\u0301 \u212b ﬁ"]
    assert read_all(path, DocRules(normalize="NFKC"))[0] == ["caf\u00e9 \u00c5 fi"]


def test_length_filters_count_what_they_drop(tmp_path):
    path = write(tmp_path / "a.txt", "a\nbb\nccc\ndddd\n")
    docs, tally = read_all(path, DocRules(format="lines", min_chars=2, max_chars=3))
    assert docs == ["bb", "ccc"]
    assert tally.counts["docs_in"] == 4
    assert tally.counts["dropped_too_short"] == 1 and tally.first["dropped_too_short"] == f"{path}:1"
    assert tally.counts["dropped_too_long"] == 1 and tally.first["dropped_too_long"] == f"{path}:4"


def test_empty_documents_are_dropped_even_with_min_chars_zero(tmp_path):
    path = write(tmp_path / "a.txt", "x\n\ny")
    docs, tally = read_all(path, DocRules(format="lines", min_chars=0))
    assert docs == ["x", "y"]
    assert tally.counts["dropped_too_short"] == 1


def test_doc_hash_and_split_are_deterministic():
    h = doc_hash("def f():\n    return 1\n")
    assert h == doc_hash("def f():\n    return 1\n")
    assert h != doc_hash("def f():\n    return 2\n")
    assert 0 <= h < 1 << 64


@pytest.mark.parametrize("fraction", [0.02, 0.2, 0.5])
def test_is_val_picks_about_the_requested_fraction(fraction):
    n = 20_000
    picked = sum(is_val(doc_hash(f"document {i}"), fraction) for i in range(n))
    assert abs(picked / n - fraction) < 0.015


# --- bad input -----------------------------------------------------------------------------


def test_empty_and_binary_files_are_skipped_and_counted(tmp_path):
    empty = write(tmp_path / "empty.txt", b"")
    blob = write(tmp_path / "blob.txt.gz", b"PK\x03\x04\x00\x00text after nul")
    for path, reason in ((empty, "files_empty"), (blob, "files_skipped_binary")):
        docs, tally = read_all(path)
        assert docs == []
        assert tally.counts[reason] == 1 and tally.first[reason] == str(path)
        assert tally.counts["files"] == 1


def test_a_truncated_gzip_is_counted_as_unreadable(tmp_path):
    path = tmp_path / "cut.txt.gz"
    full = write(tmp_path / "full.txt.gz", "some text\n" * 1000).read_bytes()
    path.write_bytes(full[: len(full) // 2])
    docs, tally = read_all(path, DocRules(format="lines"))
    assert tally.counts["files_unreadable"] == 1
    assert str(path) in tally.first["files_unreadable"]


@pytest.mark.parametrize(
    "policy, docs, reason",
    [("replace", ["caf\ufffd", "ok"], "docs_with_replaced_bytes"), ("drop", ["ok"], "dropped_undecodable")],
)
def test_undecodable_bytes_are_replaced_or_dropped_per_config(tmp_path, policy, docs, reason):
    path = write(tmp_path / "b.txt", "caf\u00e9".encode("latin-1") + b"\nok\n")
    got, tally = read_all(path, DocRules(format="lines", on_decode_error=policy))
    assert got == docs
    assert tally.counts[reason] == 1
    assert tally.first[reason] == f"{path}:1 (byte 3)"


def test_malformed_json_and_missing_fields_are_counted_with_their_line(tmp_path):
    path = write(
        tmp_path / "d.jsonl", '{"text": "one"}\n{"text": broken\n{"other": 1}\n["a"]\n{"text": 5}\n{"text": "six"}\n'
    )
    docs, tally = read_all(path, DocRules(format="jsonl"))
    assert docs == ["one", "six"]
    assert tally.counts["dropped_bad_json"] == 1 and tally.first["dropped_bad_json"] == f"{path}:2"
    assert tally.counts["dropped_missing_field"] == 3 and tally.first["dropped_missing_field"] == f"{path}:3"
    assert "text_field" in tally.problems()["dropped_missing_field"]


def test_a_malformed_line_is_fatal_when_configured_and_names_file_and_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "one"}\n\n{"text": broken\n')
    with pytest.raises(TokenmillError, match=rf"{path}:3: malformed JSON .*on_bad_record"):
        read_all(path, DocRules(format="jsonl", on_bad_record="fail"))


def test_the_fatal_line_number_is_exact_inside_a_byte_range(tmp_path):
    body = "".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(50)) + '{"text": 1}\n'
    path = write(tmp_path / "d.jsonl", body)
    with pytest.raises(TokenmillError, match=rf"{path}:51: no string field 'text'"):
        read_all(Piece(str(path), 300, None), DocRules(format="jsonl", on_bad_record="fail"))


def test_a_parquet_file_without_the_column_is_named(tmp_path):
    path = parquet(tmp_path / "d.parquet", body=["x"])
    docs, tally = read_all(path, DocRules(format="parquet"))
    assert docs == []
    assert "has no column 'text' (columns: body)" in tally.first["files_missing_column"]
    with pytest.raises(TokenmillError, match="text_field"):
        read_all(path, DocRules(format="parquet", on_bad_record="fail"))


def test_a_huge_line_is_skipped_in_bounded_memory(tmp_path):
    path = write(tmp_path / "big.txt", "short\n" + "x" * 3_000_000 + "\nafter\n")
    docs, tally = read_all(path, DocRules(format="lines", max_chars=1000))
    assert docs == ["short", "after"]
    assert tally.counts["dropped_too_long"] == 1 and tally.first["dropped_too_long"] == f"{path}:2"


def test_a_huge_whole_file_or_paragraph_is_dropped_not_loaded(tmp_path):
    path = write(tmp_path / "big.txt.gz", "p1\n\n" + "y" * 500_000 + "\n\np3\n")
    assert read_all(path, DocRules(format="text", max_chars=1000))[1].counts["dropped_too_long"] == 1
    docs, tally = read_all(path, DocRules(format="paragraphs", max_chars=1000))
    assert docs == ["p1", "p3"]
    assert tally.first["dropped_too_long"] == f"{path}:3"


# --- byte ranges ---------------------------------------------------------------------------


@pytest.mark.parametrize("cuts", [[0, 1, 2, 3, 7, 8, 9], [5], [6], [11, 12], list(range(0, 40, 3))])
def test_byte_ranges_give_every_line_to_exactly_one_piece(tmp_path, cuts):
    text = "alpha\nbeta\n\ngamma delta\nε\n" + "last line without newline"
    path = write(tmp_path / "l.txt", text)
    size = path.stat().st_size
    bounds = sorted({0, *[c for c in cuts if 0 < c < size]}) + [size]
    got = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        got += read_all(Piece(str(path), lo, None if hi == size else hi), DocRules(format="lines"))[0]
    assert got == ["alpha", "beta", "gamma delta", "ε", "last line without newline"]


def test_only_uncompressed_line_formats_are_splittable():
    assert is_splittable("a.txt", "lines") and is_splittable("a.jsonl", "jsonl")
    assert not is_splittable("a.jsonl.gz", "jsonl")
    assert not is_splittable("a.txt", "text") and not is_splittable("a.txt", "paragraphs")
