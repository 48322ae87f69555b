"""Tests for the preprocessing stage: documents, tokenizer, shards, encoding, manifest and the task.

Pure helpers are tested on tiny literal inputs; `encode_partition` runs serially in-process;
one module-scoped run of `preprocess_corpus.fn` covers the whole stage on real Dask.
"""

import gzip
import json
import random
from collections import Counter
from pathlib import Path

import dask
import numpy as np
import pyarrow as pa
import pytest

from data_catalog.loader import resolve_corpus
from tasks import manifest as mf
from tasks import preprocess
from tasks import tokenizer as tok
from tasks.atomic import atomic_path, sha256_file, write_bytes, write_json, write_with
from tasks.cluster import dask_client
from tasks.documents import DocRules, doc_hash, is_val, read_documents, split_documents
from tasks.encode import EncodeSpec, Partition, encode_partition, find_duplicates, hash_partition, plan_partitions
from tasks.shards import ShardSet, pack_rows, read_rows, write_shard
from tokenmill.config import DataConfig, TokenizerConfig
from tokenmill.errors import TokenmillError

WORDS = [
    "river", "stone", "light", "garden", "number", "return", "value", "index", "café", "naïve",
    "Straße", "日本語", "данные", "λόγος", "x1", "42", "2024", "self", "None", "count",
]


def varied_text(seed: int, n_lines: int) -> str:
    """Code-like lines with indentation, tabs, digits, punctuation and non-ASCII words."""
    r = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        indent = r.choice(["", "  ", "    ", "\t", "\t\t"])
        words = [r.choice(WORDS) for _ in range(r.randint(2, 8))]
        lines.append(indent + r.choice([" ", ", ", "_"]).join(words) + r.choice(["", ".", ":", " = 0", "()"]))
    return "\n".join(lines) + "\n"


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def read_all(path: Path, rules: DocRules) -> tuple[list[str], Counter]:
    stats: Counter = Counter()
    return list(read_documents(str(path), rules, stats)), stats


# --- pack_rows -----------------------------------------------------------------------------


def test_pack_rows_overlap_by_one_token_and_drop_the_tail():
    rows = pack_rows(np.arange(11, dtype=np.uint16), 4)
    assert rows.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert rows.dtype == np.uint16


def test_pack_rows_keep_every_next_token_pair_exactly_once():
    stream = np.arange(103)  # values are positions, so a pair (a, a+1) names where it came from
    rows = pack_rows(stream, 8)
    pairs = Counter(zip(rows[:, :-1].ravel().tolist(), rows[:, 1:].ravel().tolist()))
    assert set(pairs.values()) == {1}
    assert sorted(pairs) == [(i, i + 1) for i in range(len(rows) * 7)]
    assert len(stream) - 1 - len(pairs) < 7  # only a tail shorter than a row is lost


@pytest.mark.parametrize("n", [0, 1, 4])
def test_pack_rows_of_too_little_input_is_empty(n):
    rows = pack_rows(np.arange(n, dtype=np.int32), 6)
    assert rows.shape == (0, 6)
    assert rows.dtype == np.int32


# --- documents -----------------------------------------------------------------------------


def test_split_text_keeps_the_whole_file():
    text = "line one\n\nline two\n"
    assert list(split_documents(text, DocRules(format="text"))) == [text]


def test_split_lines_gives_one_document_per_line():
    assert list(split_documents("a\nb b\n\nc", DocRules(format="lines"))) == ["a", "b b", "", "c"]


def test_split_paragraphs_at_blank_lines():
    text = "p1 l1\np1 l2\n\np2\n\n\np3\n"
    assert [d for d in split_documents(text, DocRules(format="paragraphs")) if d] == ["p1 l1\np1 l2", "p2", "p3"]


def test_split_jsonl_reads_the_text_field():
    text = (
        '{"body": "first", "text": "ignored"}\n'
        "\n"
        '{"body": "line\\u2028separator inside"}\n'
        '{"body": 3}\n'
        '{"body": null}\n'
        '{"other": "x"}\n'
        '["not", "an", "object"]\n'
        '{"body": "last"}'
    )
    docs = list(split_documents(text, DocRules(format="jsonl", text_field="body")))
    assert docs == ["first", "line\u2028separator inside", "", "", "", "", "last"]


def test_read_documents_skips_and_counts_binary_files(tmp_path):
    path = write(tmp_path / "blob.bin", b"PK\x03\x04\x00\x00text after nul")
    docs, stats = read_all(path, DocRules())
    assert docs == []
    assert stats["files"] == 1
    assert stats["files_skipped_binary"] == 1
    assert stats["bytes_in"] == 20


def test_read_documents_counts_what_the_length_filters_drop(tmp_path):
    path = write(tmp_path / "a.txt", "a\nbb\nccc\ndddd\n")
    docs, stats = read_all(path, DocRules(format="lines", min_chars=2, max_chars=3))
    assert docs == ["bb", "ccc"]
    assert stats["docs_in"] == 5
    assert stats["dropped_too_short"] == 2  # "a" and the empty line after the last newline
    assert stats["dropped_too_long"] == 1


def test_read_documents_drops_empty_documents_even_with_min_chars_zero(tmp_path):
    path = write(tmp_path / "a.txt", "x\n\ny")
    docs, stats = read_all(path, DocRules(format="lines", min_chars=0))
    assert docs == ["x", "y"]
    assert stats["dropped_too_short"] == 1


def test_read_documents_normalizes_to_nfc(tmp_path):
    path = write(tmp_path / "a.txt", "cafe\u0301 Å")  # decomposed é and angstrom sign
    assert read_all(path, DocRules())[0] == ["caf\u00e9 \u00c5"]
    assert read_all(path, DocRules(normalize="none"))[0] == ["cafe\u0301 Å"]
    assert read_all(path, DocRules(normalize="NFKC"))[0] == ["caf\u00e9 \u00c5"]


def test_read_documents_reads_jsonl_and_counts_bad_json(tmp_path):
    good = write(tmp_path / "good.jsonl", '{"text": "one"}\n{"text": "two"}\n{"text": 5}\n')
    bad = write(tmp_path / "bad.jsonl", '{"text": "one"}\n{"text": broken\n')
    docs, stats = read_all(good, DocRules(format="jsonl"))
    assert docs == ["one", "two"]
    assert stats["docs_in"] == 3
    assert stats["dropped_too_short"] == 1
    docs, stats = read_all(bad, DocRules(format="jsonl"))
    assert docs == []
    assert stats["files_skipped_bad_json"] == 1


def test_read_documents_decompresses_gzip_and_counts_undecodable_bytes(tmp_path):
    gz = write(tmp_path / "a.txt.gz", gzip.compress("zipped text".encode()))
    assert read_all(gz, DocRules())[0] == ["zipped text"]
    latin1 = write(tmp_path / "b.txt", "caf\u00e9".encode("latin-1"))
    docs, stats = read_all(latin1, DocRules())
    assert docs == ["caf\ufffd"]
    assert stats["files_with_undecodable_bytes"] == 1


def test_doc_hash_and_split_are_deterministic():
    h = doc_hash("def f():\n    return 1\n")
    assert h == doc_hash("def f():\n    return 1\n")
    assert h != doc_hash("def f():\n    return 2\n")
    assert 0 <= h < 1 << 64
    assert is_val(h, 0.3) == is_val(h, 0.3)


@pytest.mark.parametrize("fraction", [0.02, 0.2, 0.5])
def test_is_val_picks_about_the_requested_fraction(fraction):
    n = 20_000
    picked = sum(is_val(doc_hash(f"document {i}"), fraction) for i in range(n))
    assert abs(picked / n - fraction) < 0.015


# --- dedup and partition plan --------------------------------------------------------------


def test_find_duplicates_keeps_the_first_occurrence_across_partitions():
    hashes = [np.array(h, dtype=np.uint64) for h in ([5, 7, 5], [9, 7], [], [5, 11, 9])]
    drops = find_duplicates(hashes)
    assert [d.tolist() for d in drops] == [[2], [1], [], [0, 2]]


def test_find_duplicates_of_nothing():
    assert find_duplicates([]) == []


def test_plan_partitions_groups_files_in_order():
    files = [("a", 5), ("b", 5), ("c", 5), ("big", 20), ("d", 1), ("e", 1)]
    parts = plan_partitions(files, target_bytes=10)
    assert [p.paths for p in parts] == [("a", "b"), ("c",), ("big",), ("d", "e")]
    assert [p.index for p in parts] == [0, 1, 2, 3]
    assert [p.nbytes for p in parts] == [10, 5, 20, 2]


def test_plan_partitions_depends_only_on_the_listing():
    files = [(f"f{i:03d}", 100 + 37 * i % 400) for i in range(200)]
    first = plan_partitions(files, 3000)
    assert plan_partitions(list(files), 3000) == first
    assert [p for part in first for p in part.paths] == [f for f, _ in files]
    assert all(part.nbytes <= 3000 for part in first)
    assert plan_partitions([], 3000) == []


# --- tokenizer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A small byte-fallback BPE model trained on a few KB of generated text, saved to disk."""
    root = tmp_path_factory.mktemp("tok")
    paths = [str(write(root / f"src{i}.txt", varied_text(i, 60))) for i in range(4)]
    sentences = list(tok.sample_sentences(paths, DocRules(), sample_bytes=50_000, seed=1))
    model = tok.train_sentencepiece(sentences, vocab_size=384, num_threads=1)
    path = write(root / "tokenizer.model", model)
    return path, sha256_file(path), tok.load(model)


def test_chunk_lines_respects_the_limit_and_loses_nothing():
    doc = "short\n" + "x" * 25 + "\n" + "a b\n" * 6 + "tail"
    chunks = list(tok.chunk_lines(doc, 10))
    assert "".join(chunks) == doc
    assert all(len(c) <= 10 for c in chunks)
    assert chunks[0] == "short\n"


def test_sample_sentences_is_bounded_and_repeatable(tmp_path):
    paths = [str(write(tmp_path / f"f{i}.txt", varied_text(i, 200))) for i in range(5)]
    sample = list(tok.sample_sentences(paths, DocRules(), sample_bytes=3000, seed=7))
    size = sum(len(s.encode()) for s in sample)
    assert 3000 <= size < 3000 + 4 * tok.SENTENCE_CHARS
    assert list(tok.sample_sentences(paths, DocRules(), sample_bytes=3000, seed=7)) == sample


def test_tokenizer_has_the_requested_vocab_and_an_eos(sp_model):
    _, _, sp = sp_model
    assert sp.get_piece_size() == 384
    assert sp.eos_id() == 1
    assert sp.is_control(sp.eos_id())
    assert tok.token_dtype(sp.get_piece_size()) == np.uint16
    assert tok.token_dtype(70_000) == np.int32


@pytest.mark.parametrize(
    "text",
    [
        "  two leading spaces",
        "\tTabbed\tline\n\n\n  indented river = 0",
        " café naïve Straße 日本語 данные",
        "unseen: 🙂 ∑ — ǅ \u00a0 end   ",
        "\n",
        "line\r\nwindows",
    ],
)
def test_tokenizer_round_trips_text_and_counts_its_bytes(sp_model, text):
    _, _, sp = sp_model
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    lengths = tok.piece_byte_lengths(sp)
    assert lengths[ids].sum() == len(text.encode("utf-8"))


def test_piece_byte_lengths_of_special_and_byte_pieces(sp_model):
    _, _, sp = sp_model
    lengths = tok.piece_byte_lengths(sp)
    assert lengths.shape == (384,)
    assert lengths[sp.eos_id()] == 0
    byte_ids = [i for i in range(sp.get_piece_size()) if sp.is_byte(i)]
    assert len(byte_ids) == 256
    assert set(lengths[byte_ids].tolist()) == {1}


def test_training_on_too_little_text_raises_value_error():
    with pytest.raises(ValueError):
        tok.train_sentencepiece(["ab ab ab"], vocab_size=5000, num_threads=1)


def test_tokenizer_failure_reaches_the_user_as_a_config_hint(tmp_path):
    corpus = resolve_corpus(str(write(tmp_path / "c" / "a.txt", "tiny corpus").parent))
    data = DataConfig()
    with pytest.raises(TokenmillError, match="tokenizer.vocab_size"):
        preprocess.build_tokenizer(
            corpus, preprocess.doc_rules(corpus, data), TokenizerConfig(vocab_size=8000), data.seed, tmp_path / "out"
        )


# --- shards --------------------------------------------------------------------------------


def test_write_shard_and_read_rows_round_trip(tmp_path):
    rows = np.arange(5 * 7, dtype=np.uint16).reshape(5, 7) * 1000
    path = tmp_path / "s.arrow"
    write_shard(path, rows, {"tokenizer_sha256": "abc", "row_len": 7, "split": "val"})
    back = read_rows(path)
    assert back.dtype == np.uint16
    assert np.array_equal(back, rows)
    assert not back.flags.writeable
    schema = pa.ipc.open_file(pa.memory_map(str(path))).schema
    assert schema.metadata == {b"tokenizer_sha256": b"abc", b"row_len": b"7", b"split": b"val"}
    assert schema.field("tokens").type == pa.list_(pa.uint16(), 7)


def test_int32_shards_round_trip(tmp_path):
    rows = np.array([[70_000, 1, 2], [2, 3, 69_999]], dtype=np.int32)
    write_shard(tmp_path / "s.arrow", rows, {})
    back = read_rows(tmp_path / "s.arrow")
    assert back.dtype == np.int32
    assert np.array_equal(back, rows)


def test_a_shard_with_no_rows_reads_back_empty(tmp_path):
    write_shard(tmp_path / "empty.arrow", np.empty((0, 9), dtype=np.uint16), {})
    assert read_rows(tmp_path / "empty.arrow").shape == (0, 9)


def test_shard_set_gathers_rows_across_shard_boundaries():
    a = np.arange(12, dtype=np.uint16).reshape(3, 4)
    b = np.arange(100, 108, dtype=np.uint16).reshape(2, 4)
    shards = ShardSet(shards=[a, np.empty((0, 4), np.uint16), b], row_len=4)
    assert len(shards) == 5
    out = shards.rows(np.array([4, 0, 2, 3, 2]))
    assert out.dtype == np.int64
    assert out.tolist() == [b[1].tolist(), a[0].tolist(), a[2].tolist(), b[0].tolist(), a[2].tolist()]
    out[0, 0] = -1  # a private copy: the shards are untouched
    assert b[1, 0] == 104


def test_shard_set_opens_one_split_of_a_manifest(tmp_path):
    write_shard(tmp_path / "train-0.arrow", np.ones((3, 4), np.uint16), {})
    write_shard(tmp_path / "val-0.arrow", np.full((2, 4), 7, np.uint16), {})
    write_shard(tmp_path / "train-1.arrow", np.full((1, 4), 5, np.uint16), {})
    shards = [{"path": f"{split}-{i}.arrow", "split": split} for split, i in [("train", 0), ("val", 0), ("train", 1)]]
    write_json(tmp_path / "manifest.json", {"row_len": 4, "shards": shards})
    train = ShardSet.open(tmp_path / "manifest.json", "train")
    val = ShardSet.open(tmp_path / "manifest.json", "val")
    assert (len(train), len(val)) == (4, 2)
    assert train.rows(np.array([3]))[0].tolist() == [5, 5, 5, 5]
    assert set(val.rows(np.arange(2)).ravel().tolist()) == {7}


# --- encode_partition, serially ------------------------------------------------------------


def sentence(r: random.Random, i: int) -> str:
    return f"{i} " + " ".join(r.choice(WORDS) for _ in range(r.randint(3, 9)))


def docs_in_rows(rows: np.ndarray, eos: int, sp) -> list[str]:
    """The documents whose end-of-document token made it into the rows, in order."""
    if not len(rows):
        return []
    stream = np.concatenate([rows[0], rows[1:, 1:].ravel()]).tolist()
    docs, start = [], 0
    for pos, token in enumerate(stream):
        if token == eos:
            docs.append(sp.decode(stream[start:pos]))
            start = pos + 1
    return docs


def encode_spec(sp_model, out_dir: Path, row_len: int = 9, val_fraction: float = 0.3) -> EncodeSpec:
    path, sha, _ = sp_model
    return EncodeSpec(DocRules(format="lines"), str(path), sha, row_len, val_fraction, str(out_dir))


def split_docs(result, out_dir: Path, sp) -> dict[str, list[str]]:
    by_split = {"train": [], "val": []}
    for shard in result.shards:
        by_split[shard["split"]] += docs_in_rows(read_rows(out_dir / shard["path"]), sp.eos_id(), sp)
    return by_split


def test_encode_partition_writes_shards_and_drops_duplicates(tmp_path, sp_model):
    _, sha, sp = sp_model
    r = random.Random(3)
    lines = [sentence(r, i) for i in range(60)]
    first = write(tmp_path / "in" / "a.txt", "\n".join(lines[:40]) + "\n")
    second = write(tmp_path / "in" / "b.txt", "\n".join(lines[30:] + lines[:5]) + "\n")  # 15 repeats
    part = Partition(3, (str(first), str(second)), first.stat().st_size + second.stat().st_size)
    spec = encode_spec(sp_model, tmp_path / "out")
    drops = find_duplicates([hash_partition(part, spec.rules)])[0]

    result = encode_partition(part, drops, spec)

    assert result.index == 3
    assert result.stats["dropped_duplicate"] == 15
    assert result.stats["docs_train"] + result.stats["docs_val"] == 60
    assert result.stats["docs_val"] > 0 and result.stats["docs_train"] > 0
    assert result.stats["bytes_out"] == sum(len(line.encode()) for line in lines)
    assert sorted(s["path"] for s in result.shards) == ["train-00003.arrow", "val-00003.arrow"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train-00003.arrow", "val-00003.arrow"]
    total = 0
    for shard in result.shards:
        path = tmp_path / "out" / shard["path"]
        rows = read_rows(path)
        assert shard["sha256"] == sha256_file(path)
        assert shard["rows"] == len(rows) and shard["tokens"] == rows.size
        assert rows.shape[1] == 9 and rows.max() < 384
        total += len(rows) * 8 + 1
        meta = pa.ipc.open_file(pa.memory_map(str(path))).schema.metadata
        assert meta[b"tokenizer_sha256"] == sha.encode() and meta[b"split"] == shard["split"].encode()
    assert result.stats["tokens"] - result.stats["tokens_dropped_tail"] == total

    seen = split_docs(result, tmp_path / "out", sp)
    kept = seen["train"] + seen["val"]
    assert len(kept) == len(set(kept)) >= 55  # no document twice; at most the tails are lost
    assert set(kept) <= set(lines)


def test_the_same_document_always_lands_in_the_same_split(tmp_path, sp_model):
    _, _, sp = sp_model
    r = random.Random(4)
    lines = [sentence(r, i) for i in range(80)]
    shuffled = lines[:]
    random.Random(5).shuffle(shuffled)
    one = write(tmp_path / "in" / "one.txt", "\n".join(lines))
    two = write(tmp_path / "in" / "two.txt", "\n".join(shuffled[:60]))
    spec = encode_spec(sp_model, tmp_path / "out")
    none = np.empty(0, dtype=np.int64)

    a = split_docs(encode_partition(Partition(0, (str(one),), 1), none, spec), tmp_path / "out", sp)
    b = split_docs(encode_partition(Partition(1, (str(two),), 1), none, spec), tmp_path / "out", sp)

    assert a["val"] and a["train"]
    assert not set(a["val"]) & set(b["train"])
    assert not set(a["train"]) & set(b["val"])
    assert len((set(a["val"]) | set(a["train"])) & (set(b["val"]) | set(b["train"]))) >= 50


def test_encode_partition_with_nothing_to_encode_writes_nothing(tmp_path, sp_model):
    empty = write(tmp_path / "in" / "blank.txt", "\n\n\n")
    result = encode_partition(Partition(0, (str(empty),), 3), np.empty(0, np.int64), encode_spec(sp_model, tmp_path / "out"))
    assert result.shards == []
    assert result.stats["tokens"] == 0
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- atomic writes and the manifest --------------------------------------------------------


def test_atomic_write_replaces_the_file_and_leaves_no_temp_file(tmp_path):
    dest = tmp_path / "sub" / "out.bin"
    write_bytes(dest, b"old")
    write_bytes(dest, b"new")
    assert dest.read_bytes() == b"new"
    assert [p.name for p in dest.parent.iterdir()] == ["out.bin"]


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temp_file(tmp_path):
    dest = tmp_path / "manifest.json"
    write_json(dest, {"version": 1})

    def half_written(tmp: Path) -> None:
        tmp.write_text('{"version": 2, "trunc')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_with(dest, half_written)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(dest) as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt

    assert json.loads(dest.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_failed_first_write_leaves_nothing(tmp_path):
    def crash(tmp: Path) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_with(tmp_path / "new.arrow", crash)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_manifest(tmp_path):
    write_shard(tmp_path / "train-00000.arrow", np.ones((2, 4), np.uint16), {})
    write_shard(tmp_path / "val-00000.arrow", np.zeros((1, 4), np.uint16), {})
    write_bytes(tmp_path / "tokenizer.model", b"model bytes")
    manifest = {
        "format": mf.FORMAT,
        "tokenizer": {"path": "tokenizer.model", "sha256": sha256_file(tmp_path / "tokenizer.model")},
        "shards": [
            {"path": name, "split": name.split("-")[0], "rows": 1, "tokens": 4, "sha256": sha256_file(tmp_path / name)}
            for name in ("train-00000.arrow", "val-00000.arrow")
        ],
    }
    write_json(tmp_path / mf.MANIFEST, manifest)
    return tmp_path / mf.MANIFEST, manifest


def test_verify_returns_an_intact_manifest(small_manifest):
    path, manifest = small_manifest
    assert mf.verify(path) == manifest


def test_verify_rejects_a_missing_shard(small_manifest):
    path, _ = small_manifest
    (path.parent / "val-00000.arrow").unlink()
    assert mf.verify(path) is None


def test_verify_rejects_a_changed_shard(small_manifest):
    path, _ = small_manifest
    shard = path.parent / "train-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert mf.verify(path) is None


def test_verify_rejects_a_changed_tokenizer(small_manifest):
    path, _ = small_manifest
    (path.parent / "tokenizer.model").write_bytes(b"other bytes")
    assert mf.verify(path) is None


@pytest.mark.parametrize("text", ["", "{not json", '{"format": "someone-else/v9", "shards": []}'])
def test_verify_rejects_an_unreadable_or_foreign_manifest(small_manifest, text):
    path, _ = small_manifest
    path.write_text(text)
    assert mf.verify(path) is None


def test_verify_of_no_manifest_is_none(tmp_path):
    assert mf.verify(tmp_path / mf.MANIFEST) is None


def test_output_dir_is_named_by_corpus_and_settings(tmp_path):
    corpus = resolve_corpus(str(write(tmp_path / "books" / "a.txt", "text").parent))
    tokenizer, data = TokenizerConfig(), DataConfig()
    out = preprocess.output_dir(corpus, tokenizer, data, tmp_path / "shards")
    assert out.parent == tmp_path / "shards"
    assert out.name.startswith("books-")
    assert preprocess.output_dir(corpus, TokenizerConfig(), DataConfig(), tmp_path / "shards") == out
    assert preprocess.output_dir(corpus, tokenizer, DataConfig(context_len=64), tmp_path / "shards") != out
    assert preprocess.output_dir(corpus, TokenizerConfig(vocab_size=512), data, tmp_path / "shards") != out
    write(tmp_path / "books" / "b.txt", "more")
    grown = resolve_corpus(str(tmp_path / "books"))
    assert preprocess.output_dir(grown, tokenizer, data, tmp_path / "shards") != out


# --- the preprocess task end to end --------------------------------------------------------


def python_like_module(r: random.Random, i: int) -> str:
    names = ["alpha", "beta", "gamma", "delta", "count", "items", "value", "result", "total", "index", "name", "data"]
    lines = [f"# module {i}: helpers for the {r.choice(names)} table", "import os", ""]
    for j in range(r.randint(22, 30)):
        fn = f"{r.choice(names)}_{r.choice(names)}_{j}"
        lines += [
            f"def {fn}({r.choice(names)}, {r.choice(names)}=None):",
            f'    """Return the {r.choice(names)} of {r.choice(names)} ({r.randint(0, 9999)})."""',
            f"    for {r.choice(names)} in range({r.randint(1, 99)}):",
            f"        {r.choice(names)} += {r.randint(0, 999)} * {r.choice(names)}",
            f"    return {r.choice(names)}",
            "",
        ]
    return "\n".join(lines) + "\n"


E2E_TOKENIZER = TokenizerConfig(vocab_size=400, sample_bytes=100_000)
E2E_DATA = DataConfig(context_len=32, val_fraction=0.2, partition_bytes=20_000)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """One real preprocessing run on ~170 KB of generated Python over a LocalCluster."""
    root = tmp_path_factory.mktemp("e2e")
    r = random.Random(0)
    for i in range(40):
        write(root / "src" / f"mod_{i:02d}.py", python_like_module(r, i))
    write(root / "src" / "zz_copy.py", (root / "src" / "mod_07.py").read_text())
    corpus = resolve_corpus(str(root / "src"))
    with dask.config.set({"temporary-directory": str(root / "dask")}):
        manifest_path = preprocess.preprocess_corpus.fn(corpus, E2E_TOKENIZER, E2E_DATA, root / "shards", None)
    return root, corpus, manifest_path


def test_preprocess_writes_a_verified_manifest(e2e):
    _, corpus, manifest_path = e2e
    assert corpus.total_bytes > 150_000
    manifest = mf.verify(manifest_path)
    assert manifest is not None
    assert manifest_path.parent == preprocess.output_dir(corpus, E2E_TOKENIZER, E2E_DATA, manifest_path.parent.parent)
    assert manifest["row_len"] == 33
    assert manifest["tokenizer"]["vocab_size"] == 400
    assert manifest["dtype"] == "uint16"
    assert manifest["corpus"] == {"name": "src", "fingerprint": corpus.fingerprint, "files": 41, "bytes": corpus.total_bytes}
    stats = manifest["stats"]
    assert stats["docs_in"] == 41
    assert stats["dropped_duplicate"] == 1
    assert stats["docs_train"] + stats["docs_val"] == 40 and stats["docs_val"] > 0
    partitions = plan_partitions([(f.path, f.size) for f in corpus.files], E2E_DATA.partition_bytes)
    assert len(partitions) >= 5
    assert {s["split"] for s in manifest["shards"]} == {"train", "val"}
    for split in ("train", "val"):
        rows = ShardSet.open(manifest_path, split)
        assert len(rows) == mf.split_summary(manifest, split)["rows"] > 0
        sample = rows.rows(np.arange(len(rows)))
        assert sample.shape[1] == 33 and 0 <= sample.min() and sample.max() < 400


def test_preprocess_a_second_time_is_a_cache_hit(e2e):
    root, corpus, manifest_path = e2e
    before = {p.name: p.stat().st_mtime_ns for p in manifest_path.parent.iterdir()}
    again = preprocess.preprocess_corpus.fn(corpus, E2E_TOKENIZER, E2E_DATA, root / "shards", None)
    assert again == manifest_path
    assert {p.name: p.stat().st_mtime_ns for p in manifest_path.parent.iterdir()} == before


def test_shards_do_not_depend_on_the_number_of_workers(e2e):
    root, corpus, manifest_path = e2e
    manifest = mf.verify(manifest_path)
    rules = preprocess.doc_rules(corpus, E2E_DATA)
    parts = plan_partitions([(f.path, f.size) for f in corpus.files], E2E_DATA.partition_bytes)
    shas = {}
    for n_workers in (1, 2):
        out = root / f"workers-{n_workers}"
        spec = EncodeSpec(
            rules, str(manifest_path.parent / "tokenizer.model"), manifest["tokenizer"]["sha256"], 33, 0.2, str(out)
        )
        with dask.config.set({"temporary-directory": str(root / "dask")}), dask_client(None, n_workers=n_workers) as client:
            assert len(client.scheduler_info()["workers"]) == n_workers
            results = preprocess.run_partitions(parts, spec, client.scheduler.address)
        shas[n_workers] = [(s["path"], s["sha256"]) for r in results for s in r.shards]
        assert [(s["path"], sha256_file(out / s["path"])) for r in results for s in r.shards] == shas[n_workers]
    assert shas[1] == shas[2]
    assert shas[1] == [(s["path"], s["sha256"]) for s in manifest["shards"]]
