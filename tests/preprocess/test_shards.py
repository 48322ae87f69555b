"""Tokenizer, shard files, packing, atomic writes and the manifest: the building blocks of the stage.

Pure helpers on tiny literal inputs; no Dask, no Prefect.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_catalog.loader import resolve_corpus
from tasks.core import manifest as mf
from tasks.core.atomic import atomic_path, sha256_file, write_bytes, write_json, write_with
from tasks.core.shards import ShardSet, pack_rows, read_rows, write_shard
from tasks.core.tokenizer import piece_byte_lengths, token_dtype
from tasks.preprocess import base as preprocess
from tasks.preprocess import tokenizer as tok
from tasks.preprocess.documents import DocRules
from tokenmill.config import DataConfig, TokenizerConfig
from tokenmill.errors import TokenmillError

from preprocess_helpers import small_tokenizer, varied_text, write

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


# --- tokenizer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp("tok"))


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
    assert token_dtype(sp.get_piece_size()) == np.uint16
    assert token_dtype(70_000) == np.int32


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
    lengths = piece_byte_lengths(sp)
    assert lengths[ids].sum() == len(text.encode("utf-8"))


def test_piece_byte_lengths_of_special_and_byte_pieces(sp_model):
    _, _, sp = sp_model
    lengths = piece_byte_lengths(sp)
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
