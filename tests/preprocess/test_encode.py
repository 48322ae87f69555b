"""Partition planning and the per-partition worker functions, run serially in this process.

Covers packing boundaries (EOS between documents, no token lost), dedup, split
determinism, rows decoding back to the source text, and reuse of finished partitions.
"""

import random
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pytest

from data_catalog.listing import SourceFile
from tasks.core.atomic import sha256_file
from tasks.core.shards import read_rows
from tasks.preprocess import incremental
from tasks.preprocess.documents import DocRules
from tasks.preprocess.encode import (
    EncodeSpec,
    drop_repeats,
    encode_key,
    encode_partition,
    find_duplicates,
    hash_partition,
    load_hashes,
    source_key,
)
from tasks.preprocess.partitions import Partition, plan_partitions
from tasks.preprocess.sources import Piece

from preprocess_helpers import sentence, small_tokenizer, write


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp("tok"))


def files(*sizes: int, prefix: str = "f") -> list[SourceFile]:
    return [SourceFile(path=f"/c/{prefix}{i:03d}.txt", size=n, mtime_ns=1) for i, n in enumerate(sizes)]


def part_of(*paths: Path, index: int = 0) -> Partition:
    return Partition(
        index, tuple(Piece(str(p)) for p in paths), sum(p.stat().st_size for p in paths), tuple(map(str, paths))
    )


def encode_spec(sp_model, out_dir: Path, row_len: int = 9, val_fraction: float = 0.3, fmt: str = "lines") -> EncodeSpec:
    path, sha, _ = sp_model
    return EncodeSpec(DocRules(format=fmt), str(path), sha, row_len, val_fraction, str(out_dir))


def stream_of(rows: np.ndarray) -> list[int]:
    """The token stream that overlapping rows were cut from."""
    return np.concatenate([rows[0], rows[1:, 1:].ravel()]).tolist() if len(rows) else []


def docs_in_rows(rows: np.ndarray, eos: int, sp) -> list[str]:
    """The documents whose end-of-document token made it into the rows, in order."""
    stream, docs, start = stream_of(rows), [], 0
    for pos, token in enumerate(stream):
        if token == eos:
            docs.append(sp.decode(stream[start:pos]))
            start = pos + 1
    return docs


def split_docs(result, out_dir: Path, sp) -> dict[str, list[str]]:
    by_split = {"train": [], "val": []}
    for shard in result.shards:
        by_split[shard["split"]] += docs_in_rows(read_rows(out_dir / shard["path"]), sp.eos_id(), sp)
    return by_split


# --- partition plan ------------------------------------------------------------------------


def test_a_large_file_stands_alone_and_small_ones_are_grouped():
    parts = plan_partitions(files(5, 5, 5, 40, 1, 1), "text", target_bytes=10)
    assert any(p.paths == ("/c/f003.txt",) for p in parts)
    assert [path for p in parts for path in p.paths] == [f"/c/f{i:03d}.txt" for i in range(6)]
    assert [p.index for p in parts] == list(range(len(parts)))


def test_partitions_are_bounded_and_depend_only_on_the_listing():
    listing = files(*[100 + 37 * i % 400 for i in range(300)])
    first = plan_partitions(listing, "text", 3000)
    assert plan_partitions(list(listing), "text", 3000) == first
    assert all(p.nbytes <= 12000 for p in first)
    assert 10 <= len(first) <= 60  # about total / target
    assert plan_partitions([], "text", 3000) == []


def test_large_line_files_are_split_into_byte_ranges_and_compressed_ones_are_not():
    big = [SourceFile(path="/c/big.jsonl", size=1000), SourceFile(path="/c/big.jsonl.gz", size=1000)]
    parts = plan_partitions(big, "jsonl", target_bytes=300)
    ranges = [(p.pieces[0].start, p.pieces[0].end) for p in parts if p.paths == ("/c/big.jsonl",)]
    assert ranges == [(0, 250), (250, 500), (500, 750), (750, None)]
    assert [p.paths for p in parts][-1] == ("/c/big.jsonl.gz",)


def test_adding_a_file_changes_only_the_partition_it_joins():
    listing = files(*[1000] * 200)
    before = plan_partitions(listing, "text", 8000)
    grown = sorted([*listing, SourceFile(path="/c/f100a.txt", size=1000, mtime_ns=1)], key=lambda f: f.path)
    after = plan_partitions(grown, "text", 8000)
    changed = {p.identity for p in after} - {p.identity for p in before}
    assert len(changed) == 1
    assert any("/c/f100a.txt" in i for i in next(iter(changed)))


# --- dedup ---------------------------------------------------------------------------------


def test_find_duplicates_keeps_the_first_occurrence_across_partitions():
    hashes = [np.array(h, dtype=np.uint64) for h in ([5, 7, 5], [9, 7], [], [5, 11, 9])]
    drops = find_duplicates(hashes)
    assert [d.tolist() for d in drops] == [[2], [1], [], [0, 2]]
    assert find_duplicates([]) == []


def test_hash_partition_caches_its_hashes_and_tally(tmp_path):
    path = write(tmp_path / "a.txt", "x\ny\nx\n\n")
    part = part_of(path)
    fresh = hash_partition(part, DocRules(format="lines"), str(tmp_path / "h.npz"))
    cached = load_hashes(0, tmp_path / "h.npz")
    assert len(fresh.hashes) == 3 and fresh.hashes[0] == fresh.hashes[2]
    assert cached.hashes.tolist() == fresh.hashes.tolist()
    assert cached.tally.counts == fresh.tally.counts


# --- encode_partition ----------------------------------------------------------------------


def test_encode_partition_writes_shards_and_drops_duplicates(tmp_path, sp_model):
    _, sha, sp = sp_model
    r = random.Random(3)
    lines = [sentence(r, i) for i in range(60)]
    first = write(tmp_path / "in" / "a.txt", "\n".join(lines[:40]) + "\n")
    second = write(tmp_path / "in" / "b.txt", "\n".join(lines[30:] + lines[:5]) + "\n")  # 15 repeats
    part = part_of(first, second, index=3)
    spec = encode_spec(sp_model, tmp_path / "out")
    drops = find_duplicates([hash_partition(part, spec.rules).hashes])[0]

    result = encode_partition(part, drops, spec, key="k3")

    assert result.index == 3
    assert result.stats["dropped_duplicate"] == 15
    assert result.stats["docs_train"] + result.stats["docs_val"] == 60
    assert result.stats["docs_val"] > 0 and result.stats["docs_train"] > 0
    assert result.stats["bytes_out"] == sum(len(line.encode()) for line in lines)
    assert sorted(s["path"] for s in result.shards) == ["train-00003.arrow", "val-00003.arrow"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["parts", "train-00003.arrow", "val-00003.arrow"]
    assert (tmp_path / "out" / "parts" / "k3.json").is_file()
    for shard in result.shards:
        path = tmp_path / "out" / shard["path"]
        rows = read_rows(path)
        assert shard["sha256"] == sha256_file(path)
        assert shard["rows"] == len(rows) and shard["tokens"] == rows.size
        assert rows.shape[1] == 9 and rows.max() < 384
        meta = pa.ipc.open_file(pa.memory_map(str(path))).schema.metadata
        assert meta[b"tokenizer_sha256"] == sha.encode() and meta[b"split"] == shard["split"].encode()

    seen = split_docs(result, tmp_path / "out", sp)
    kept = seen["train"] + seen["val"]
    assert len(kept) == len(set(kept)) >= 55  # no document twice; at most the tails are lost
    assert set(kept) <= set(lines)


def test_a_first_pass_drops_only_repeats_within_its_partition_and_names_its_guess(tmp_path, sp_model):
    r = random.Random(4)
    lines = [sentence(r, i) for i in range(50)]
    path = write(tmp_path / "in" / "a.txt", "\n".join(lines + lines[:7]) + "\n")
    part, spec = part_of(path, index=2), encode_spec(sp_model, tmp_path / "out")

    guess = encode_partition(part, None, spec, hashes_dest=str(tmp_path / "out" / "h.npz"))

    assert guess.stats["dropped_duplicate"] == 7
    local = find_duplicates([guess.hashes])[0]
    assert guess.key == encode_key(source_key(part, spec.rules), local, spec)
    assert (tmp_path / "out" / "parts" / f"{guess.key}.json").is_file()
    assert load_hashes(2, tmp_path / "out" / "h.npz").hashes.tolist() == guess.hashes.tolist()
    assert guess.hash_result().hashes.tolist() == hash_partition(part, spec.rules).hashes.tolist()
    again = encode_partition(part, local, spec, key="known")
    assert [s["sha256"] for s in again.shards] == [s["sha256"] for s in guess.shards]


@pytest.mark.parametrize("dropped", [[0, 3, 4, 20, 41, 42, 59], list(range(59)), []])
def test_dropping_repeats_from_a_first_pass_equals_encoding_without_them(tmp_path, sp_model, dropped):
    r = random.Random(5)
    lines = [sentence(r, i) for i in range(60)]
    path = write(tmp_path / "in" / "a.txt", "\n".join(lines + lines[10:13]) + "\n")
    part, spec = part_of(path, index=4), encode_spec(sp_model, tmp_path / "guessed")
    guess = encode_partition(part, None, spec)
    drop = np.array(sorted({*dropped, 60, 61, 62}), np.int64)  # the repeats within it stay dropped

    repacked = drop_repeats(guess, drop, spec, key="settled")
    encoded = encode_partition(part, drop, encode_spec(sp_model, tmp_path / "fresh"), key="settled")

    assert [(s["path"], s["sha256"]) for s in repacked.shards] == [(s["path"], s["sha256"]) for s in encoded.shards]
    assert {k: v for k, v in repacked.stats.items() if k != "seconds_in_workers"} == {
        k: v for k, v in encoded.stats.items() if k != "seconds_in_workers"
    }
    assert sorted(p.name for p in (tmp_path / "guessed").glob("*.arrow")) == sorted(s["path"] for s in encoded.shards)
    assert repacked.repacked and (tmp_path / "guessed" / "parts" / "settled.json").is_file()


def test_packing_puts_eos_between_documents_and_loses_no_token_but_the_tail(tmp_path, sp_model):
    _, _, sp = sp_model
    r = random.Random(8)
    lines = [sentence(r, i) for i in range(120)]
    path = write(tmp_path / "in" / "a.txt", "\n".join(lines) + "\n")
    spec = encode_spec(sp_model, tmp_path / "out", row_len=17, val_fraction=0.25)

    result = encode_partition(part_of(path), np.empty(0, np.int64), spec)

    for split in ("train", "val"):
        docs = [line for line in lines if _is_val_doc(line, spec) == (split == "val")]
        expected = [t for doc in docs for t in [*sp.encode(doc), sp.eos_id()]]
        shard = next(s for s in result.shards if s["split"] == split)
        got = stream_of(read_rows(tmp_path / "out" / shard["path"]))
        assert got == expected[: len(got)]  # the shard is the documents' tokens + EOS, in order
        assert len(expected) - len(got) < spec.row_len - 1  # only a tail shorter than a row is lost
    assert result.stats["tokens"] == sum(len(sp.encode(doc)) + 1 for doc in lines)
    tail = result.stats["tokens_dropped_tail"]
    assert result.stats["tokens"] - tail == sum(
        len(stream_of(read_rows(tmp_path / "out" / s["path"]))) for s in result.shards
    )


def _is_val_doc(doc: str, spec: EncodeSpec) -> bool:
    from tasks.preprocess.documents import doc_hash, is_val

    return is_val(doc_hash(doc), spec.val_fraction)


def test_shard_rows_decode_back_to_the_original_text(tmp_path, sp_model):
    _, _, sp = sp_model
    text = "def café():\n\treturn 'naïve Straße 日本語'  \n\n\n  # 🙂 end\r\n"
    path = write(tmp_path / "in" / "one.py", text)
    spec = encode_spec(sp_model, tmp_path / "out", row_len=8, val_fraction=0.000001, fmt="text")

    result = encode_partition(part_of(path), np.empty(0, np.int64), spec)

    rows = read_rows(tmp_path / "out" / result.shards[0]["path"])
    assert sp.decode(stream_of(rows)).startswith(text[: len(text) - 12])
    assert result.stats["tokens_dropped_tail"] < 7
    if not result.stats["tokens_dropped_tail"]:
        assert sp.decode(stream_of(rows)[:-1]) == text


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

    a = split_docs(encode_partition(part_of(one, index=0), none, spec), tmp_path / "out", sp)
    b = split_docs(encode_partition(part_of(two, index=1), none, spec), tmp_path / "out", sp)

    assert a["val"] and a["train"]
    assert not set(a["val"]) & set(b["train"])
    assert not set(a["train"]) & set(b["val"])
    assert len((set(a["val"]) | set(a["train"])) & (set(b["val"]) | set(b["train"]))) >= 50


def test_encode_partition_with_nothing_to_encode_writes_no_shard(tmp_path, sp_model):
    empty = write(tmp_path / "in" / "blank.txt", "\n\n\n")
    result = encode_partition(part_of(empty), np.empty(0, np.int64), encode_spec(sp_model, tmp_path / "out"))
    assert result.shards == []
    assert result.stats["tokens"] == 0
    assert not list((tmp_path / "out").glob("*.arrow"))


def test_encode_partition_reads_fsspec_urls(tmp_path, sp_model):
    _, _, sp = sp_model
    fsspec.filesystem("memory").pipe("/enc/a.txt", "\n".join(f"memory line {i}" for i in range(40)).encode())
    part = Partition(0, (Piece("memory:///enc/a.txt"),), 1, ("m",))
    result = encode_partition(part, np.empty(0, np.int64), encode_spec(sp_model, tmp_path / "out", val_fraction=0.01))
    assert result.stats["docs_train"] + result.stats["docs_val"] == 40
    assert "memory line 0" in split_docs(result, tmp_path / "out", sp)["train"]


# --- keys and reuse ------------------------------------------------------------------------


def test_encode_key_changes_with_drops_tokenizer_and_packing(tmp_path, sp_model):
    spec = encode_spec(sp_model, tmp_path)
    part = part_of(write(tmp_path / "a.txt", "a\n"))
    skey = source_key(part, spec.rules)
    base = encode_key(skey, np.array([], np.int64), spec)
    assert encode_key(skey, np.array([], np.int64), spec) == base
    assert encode_key(skey, np.array([2]), spec) != base
    assert encode_key(skey, np.array([], np.int64), EncodeSpec(spec.rules, "p", "other-sha", 9, 0.3, "o")) != base
    assert (
        encode_key(skey, np.array([], np.int64), EncodeSpec(spec.rules, "p", spec.tokenizer_sha256, 17, 0.3, "o"))
        != base
    )
    assert source_key(part, DocRules(format="text")) != skey


def test_a_finished_partition_is_reused_from_an_earlier_build(tmp_path, sp_model):
    _, _, sp = sp_model
    path = write(tmp_path / "in" / "a.txt", "\n".join(f"line number {i}" for i in range(50)))
    old, new = tmp_path / "shards" / "c-old", tmp_path / "shards" / "c-new"
    encode_partition(part_of(path, index=0), np.empty(0, np.int64), encode_spec(sp_model, old), key="abc")

    found = incremental.find_partition([new, old], "abc", index=4)

    assert found is not None and found.reused and found.index == 4
    assert sorted(s["path"] for s in found.shards) == ["train-00004.arrow", "val-00004.arrow"]
    for shard in found.shards:
        assert sha256_file(new / shard["path"]) == shard["sha256"]
    assert (new / "parts" / "abc.json").is_file()
    assert incremental.find_partition([new, old], "other", index=4) is None


def test_a_tampered_shard_is_not_reused(tmp_path, sp_model):
    path = write(tmp_path / "in" / "a.txt", "\n".join(f"line number {i}" for i in range(50)))
    old = tmp_path / "shards" / "c-old"
    result = encode_partition(part_of(path), np.empty(0, np.int64), encode_spec(sp_model, old), key="abc")
    (old / result.shards[0]["path"]).write_bytes(b"garbage")
    assert incremental.find_partition([tmp_path / "shards" / "c-new", old], "abc", index=0) is None
