"""The per-partition work of preprocessing, run on Dask workers (or serially in tests).

Workers do not know who runs them: each function takes a partition and settings and
returns small results. Shards are written by the worker itself, atomically, then a small
partition record (`parts/<key>.json`) that marks the partition done, so only stats travel
back to the client and a rerun or a grown corpus reuses finished partitions. The
tokenizer is loaded once per worker process and cached.
"""

from __future__ import annotations

import functools
import io
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tasks import tokenizer as tok
from tasks.atomic import sha256_file, write_bytes, write_json, write_with
from tasks.documents import DocRules, Tally, doc_hash, is_val, read_documents
from tasks.manifest import FORMAT, content_key
from tasks.partitions import Partition
from tasks.shards import pack_rows, write_shard

ENCODE_BATCH_DOCS = 1024
ENCODE_BATCH_CHARS = 1 << 20
PARTS = "parts"
HASHES = "hashes"


@dataclass(frozen=True)
class EncodeSpec:
    """Everything a worker needs to encode a partition, small enough to ship per task."""

    rules: DocRules
    tokenizer_path: str
    tokenizer_sha256: str
    row_len: int
    val_fraction: float
    out_dir: str


@dataclass
class PartitionResult:
    index: int
    key: str = ""
    shards: list[dict] = field(default_factory=list)
    stats: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)  # where each drop reason was first seen
    reused: bool = False

    def to_json(self) -> dict:
        return {**asdict(self), "stats": dict(self.stats)}

    @classmethod
    def from_json(cls, obj: dict) -> PartitionResult:
        return cls(obj["index"], obj["key"], obj["shards"], Counter(obj["stats"]), obj.get("first", {}), obj.get("reused", False))


@dataclass
class HashResult:
    index: int
    hashes: np.ndarray
    tally: Tally


def source_key(part: Partition, rules: DocRules) -> str:
    """Names a partition's input: its pieces' file versions and the reading rules."""
    return content_key(FORMAT, "source", list(part.identity), asdict(rules))


def encode_key(skey: str, drops: np.ndarray, spec: EncodeSpec) -> str:
    """Names a partition's shards: its input, which documents dedup drops, the tokenizer and packing."""
    dropped = content_key(np.asarray(drops, dtype=np.int64).tolist())
    return content_key(FORMAT, "encode", skey, dropped, spec.tokenizer_sha256, spec.row_len, spec.val_fraction)


def hash_partition(part: Partition, rules: DocRules, dest: str | None = None) -> HashResult:
    """The 64-bit hash of every kept document of the partition, in reading order; cached at `dest`."""
    tally = Tally()
    hashes = np.array([doc_hash(doc) for piece in part.pieces for doc in read_documents(piece, rules, tally)], np.uint64)
    if dest:
        buf = io.BytesIO()
        np.savez(buf, hashes=hashes, tally=np.frombuffer(json.dumps([tally.counts, tally.first]).encode(), np.uint8))
        write_bytes(Path(dest), buf.getvalue())
    return HashResult(part.index, hashes, tally)


def load_hashes(index: int, path: Path) -> HashResult:
    with np.load(path) as npz:
        counts, first = json.loads(npz["tally"].tobytes())
        return HashResult(index, npz["hashes"], Tally(Counter(counts), first))


def find_duplicates(hashes: list[np.ndarray]) -> list[np.ndarray]:
    """Per partition, the positions of documents seen earlier in the corpus (first one wins)."""
    flat = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
    _, first = np.unique(flat, return_index=True)
    dup = np.ones(len(flat), dtype=bool)
    dup[first] = False
    bounds = np.cumsum([0] + [len(h) for h in hashes])
    return [np.flatnonzero(dup[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


@functools.lru_cache(maxsize=2)
def _processor(path: str, sha256: str):  # sha in the key: a new tokenizer is never served stale
    return tok.load(Path(path).read_bytes())


class _SplitStreams:
    """Documents of each split, encoded in batches (one SentencePiece call each) into token arrays."""

    def __init__(self, sp, dtype) -> None:
        self.sp, self.dtype, self.eos = sp, dtype, sp.eos_id()
        self.batch: dict[str, list[str]] = {"train": [], "val": []}
        self.chars = {"train": 0, "val": 0}
        self.chunks: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        self.bytes_out = 0

    def add(self, split: str, doc: str) -> None:
        self.batch[split].append(doc)
        self.chars[split] += len(doc)
        if len(self.batch[split]) >= ENCODE_BATCH_DOCS or self.chars[split] >= ENCODE_BATCH_CHARS:
            self.flush(split)

    def flush(self, split: str) -> None:
        docs = self.batch[split]
        if not docs:
            return
        flat: list[int] = []
        for ids in self.sp.encode(docs, num_threads=1):
            flat += ids
            flat.append(self.eos)
        self.chunks[split].append(np.array(flat, dtype=self.dtype))
        self.bytes_out += sum(len(d.encode("utf-8")) for d in docs)
        docs.clear()
        self.chars[split] = 0

    def stream(self, split: str) -> np.ndarray:
        self.flush(split)
        chunks = self.chunks[split]
        return np.concatenate(chunks) if chunks else np.empty(0, dtype=self.dtype)


def encode_partition(part: Partition, drop: np.ndarray, spec: EncodeSpec, key: str = "") -> PartitionResult:
    """Read, filter, dedup, split, encode and pack one partition; write its shards, then its record."""
    started = time.perf_counter()
    sp = _processor(spec.tokenizer_path, spec.tokenizer_sha256)
    dtype = tok.token_dtype(sp.get_piece_size())
    result = PartitionResult(index=part.index, key=key)
    tally = Tally()
    drop_set = set(np.asarray(drop).tolist())
    streams = _SplitStreams(sp, dtype)
    position = 0
    for piece in part.pieces:
        for doc in read_documents(piece, spec.rules, tally):
            position += 1
            if position - 1 in drop_set:
                result.stats["dropped_duplicate"] += 1
                continue
            split = "val" if is_val(doc_hash(doc), spec.val_fraction) else "train"
            result.stats[f"docs_{split}"] += 1
            streams.add(split, doc)
    for split in ("train", "val"):
        _write_split(part.index, split, streams.stream(split), spec, result)
    result.stats.update(tally.counts)
    result.stats["bytes_out"] += streams.bytes_out
    result.first = dict(tally.first)
    result.stats["seconds_in_workers"] = round(time.perf_counter() - started, 3)
    if key:
        write_json(Path(spec.out_dir) / PARTS / f"{key}.json", result.to_json())
    return result


def _write_split(index: int, split: str, stream: np.ndarray, spec: EncodeSpec, result: PartitionResult) -> None:
    rows = pack_rows(stream, spec.row_len)
    result.stats["tokens"] += len(stream)
    result.stats["tokens_dropped_tail"] += len(stream) - (len(rows) * (spec.row_len - 1) + 1 if len(rows) else 0)
    if not len(rows):
        return
    name = shard_name(split, index)
    dest = Path(spec.out_dir) / name
    meta = {"tokenizer_sha256": spec.tokenizer_sha256, "row_len": spec.row_len, "split": split}
    write_with(dest, lambda tmp: write_shard(tmp, rows, meta))
    result.shards.append(
        {"path": name, "split": split, "rows": int(len(rows)), "tokens": int(rows.size), "sha256": sha256_file(dest)}
    )


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.arrow"
