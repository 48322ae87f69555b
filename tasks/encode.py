"""The per-partition work of preprocessing, run on Dask workers (or serially in tests).

Workers do not know who runs them: each function takes a partition and settings and
returns small results. Shards are written by the worker itself, atomically, so only stats
travel back to the client. The tokenizer is loaded once per worker process and cached.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks import tokenizer as tok
from tasks.atomic import sha256_file, write_with
from tasks.documents import DocRules, doc_hash, is_val, read_documents
from tasks.shards import pack_rows, write_shard

ENCODE_BATCH_DOCS = 256


@dataclass(frozen=True)
class Partition:
    index: int
    paths: tuple[str, ...]
    nbytes: int


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
    shards: list[dict] = field(default_factory=list)
    stats: Counter = field(default_factory=Counter)


def plan_partitions(files: list[tuple[str, int]], target_bytes: int) -> list[Partition]:
    """Group files, in order, into partitions of about `target_bytes` (a large file stands alone).

    The plan depends only on the file listing, never on the number of workers, which is
    what makes the shards identical whatever the cluster size.
    """
    parts: list[Partition] = []
    batch: list[str] = []
    size = 0
    for path, nbytes in files:
        if batch and size + nbytes > target_bytes:
            parts.append(Partition(len(parts), tuple(batch), size))
            batch, size = [], 0
        batch.append(path)
        size += nbytes
    if batch:
        parts.append(Partition(len(parts), tuple(batch), size))
    return parts


def hash_partition(part: Partition, rules: DocRules) -> np.ndarray:
    """The 64-bit hash of every kept document of the partition, in reading order."""
    stats: Counter = Counter()
    hashes = [doc_hash(doc) for path in part.paths for doc in read_documents(path, rules, stats)]
    return np.array(hashes, dtype=np.uint64)


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


def encode_partition(part: Partition, drop: np.ndarray, spec: EncodeSpec) -> PartitionResult:
    """Read, filter, dedup, split, encode and pack one partition; write its shards."""
    sp = _processor(spec.tokenizer_path, spec.tokenizer_sha256)
    eos = sp.eos_id()
    dtype = tok.token_dtype(sp.get_piece_size())
    result = PartitionResult(index=part.index)
    drop_set = set(drop.tolist())
    streams: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    batch: dict[str, list[str]] = {"train": [], "val": []}

    def flush(split: str) -> None:
        docs = batch[split]
        if docs:
            for ids in sp.encode(docs, num_threads=1):
                ids.append(eos)
                streams[split].append(np.asarray(ids, dtype=dtype))
            result.stats["bytes_out"] += sum(len(d.encode("utf-8")) for d in docs)
            docs.clear()

    position = 0
    for path in part.paths:
        for doc in read_documents(path, spec.rules, result.stats):
            position += 1
            if position - 1 in drop_set:
                result.stats["dropped_duplicate"] += 1
                continue
            split = "val" if is_val(doc_hash(doc), spec.val_fraction) else "train"
            result.stats[f"docs_{split}"] += 1
            batch[split].append(doc)
            if len(batch[split]) >= ENCODE_BATCH_DOCS:
                flush(split)
    for split in streams:
        flush(split)
        _write_split(part.index, split, streams[split], dtype, spec, result)
    return result


def _write_split(index: int, split: str, chunks: list[np.ndarray], dtype, spec: EncodeSpec, result: PartitionResult) -> None:
    stream = np.concatenate(chunks) if chunks else np.empty(0, dtype=dtype)
    rows = pack_rows(stream, spec.row_len)
    result.stats["tokens"] += len(stream)
    result.stats["tokens_dropped_tail"] += len(stream) - (len(rows) * (spec.row_len - 1) + 1 if len(rows) else 0)
    if not len(rows):
        return
    name = f"{split}-{index:05d}.arrow"
    dest = Path(spec.out_dir) / name
    meta = {"tokenizer_sha256": spec.tokenizer_sha256, "row_len": spec.row_len, "split": split}
    write_with(dest, lambda tmp: write_shard(tmp, rows, meta))
    result.shards.append(
        {"path": name, "split": split, "rows": int(len(rows)), "tokens": int(rows.size), "sha256": sha256_file(dest)}
    )
