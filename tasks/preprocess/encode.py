"""The per-partition work of preprocessing, run on Dask workers (or serially in tests).

Workers do not know who runs them: each function takes a partition and settings and
returns small results. Shards are written by the worker itself, atomically, then a small
partition record (`parts/<key>.json`) that marks the partition done, so only stats and
document hashes travel back to the client and a rerun or a grown corpus reuses finished
partitions. The tokenizer is loaded once per worker process and cached.

A partition can be encoded before the corpus-wide duplicates are known (`drop=None`): it
then drops only documents repeated within itself, records the hashes of all its documents,
and names its record by that guess. It also keeps where each document's tokens lie
(`spans/<key>.npz`), so a partition that turns out to repeat an earlier one's documents is
repacked without them (`drop_repeats`) instead of being encoded again.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tasks.core.atomic import write_bytes, write_json
from tasks.core.manifest import FORMAT, content_key
from tasks.core.shards import pack_rows, read_rows, write_shard, write_split
from tasks.core.tokenizer import token_dtype, worker_tokenizer
from tasks.preprocess.documents import DocRules, Tally, doc_hash, is_val, read_documents
from tasks.preprocess.partitions import Partition

ENCODE_BATCH_DOCS = 1024
ENCODE_BATCH_CHARS = 1 << 20
PARTS = "parts"
HASHES = "hashes"
SPANS = "spans"


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
    repacked: bool = False  # cut from a first pass's shards by drop_repeats, not encoded
    hashes: np.ndarray | None = None  # every document's hash, in reading order; not recorded

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "key": self.key,
            "shards": self.shards,
            "stats": dict(self.stats),
            "first": self.first,
            "reused": self.reused,
            "repacked": self.repacked,
        }

    def hash_result(self) -> HashResult:
        """What `hash_partition` would have returned for this partition (the result of a first pass)."""
        return HashResult(self.index, self.hashes, Tally(Counter(self.stats), self.first))

    @classmethod
    def from_json(cls, obj: dict) -> PartitionResult:
        return cls(
            obj["index"],
            obj["key"],
            obj["shards"],
            Counter(obj["stats"]),
            obj.get("first", {}),
            obj.get("reused", False),
            obj.get("repacked", False),
        )


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
    hashes = np.array(
        [doc_hash(doc) for piece in part.pieces for doc in read_documents(piece, rules, tally)], np.uint64
    )
    if dest:
        save_hashes(Path(dest), hashes, tally)
    return HashResult(part.index, hashes, tally)


def save_hashes(dest: Path, hashes: np.ndarray, tally: Tally) -> None:
    buf = io.BytesIO()
    np.savez(buf, hashes=hashes, tally=np.frombuffer(json.dumps([tally.counts, tally.first]).encode(), np.uint8))
    write_bytes(dest, buf.getvalue())


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


class _SplitStreams:
    """Documents of each split, encoded in batches (one SentencePiece call each) into token arrays."""

    def __init__(self, sp, dtype) -> None:
        self.sp, self.dtype, self.eos = sp, dtype, sp.eos_id()
        self.batch: dict[str, list[str]] = {"train": [], "val": []}
        self.chars = {"train": 0, "val": 0}
        self.chunks: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        self.bytes_out = 0
        # per document, in stream order: its position in the partition, its tokens (with EOS), its bytes
        self.spans: dict[str, list[list[int]]] = {"train": [[], [], []], "val": [[], [], []]}

    def add(self, split: str, doc: str, position: int) -> None:
        self.spans[split][0].append(position)
        self.batch[split].append(doc)
        self.chars[split] += len(doc)
        if len(self.batch[split]) >= ENCODE_BATCH_DOCS or self.chars[split] >= ENCODE_BATCH_CHARS:
            self.flush(split)

    def flush(self, split: str) -> None:
        docs = self.batch[split]
        if not docs:
            return
        encoded = self.sp.encode(docs, num_threads=1)
        for ids in encoded:
            ids.append(self.eos)
        # one pass from the lists into numpy, without an intermediate flat list
        lengths = [len(ids) for ids in encoded]
        self.chunks[split].append(np.fromiter(itertools.chain.from_iterable(encoded), self.dtype, count=sum(lengths)))
        sizes = [len(d.encode("utf-8")) for d in docs]
        self.spans[split][1] += lengths
        self.spans[split][2] += sizes
        self.bytes_out += sum(sizes)
        docs.clear()
        self.chars[split] = 0

    def stream(self, split: str) -> np.ndarray:
        self.flush(split)
        chunks = self.chunks[split]
        return np.concatenate(chunks) if chunks else np.empty(0, dtype=self.dtype)


def encode_partition(
    part: Partition, drop: np.ndarray | None, spec: EncodeSpec, key: str = "", hashes_dest: str | None = None
) -> PartitionResult:
    """Read, filter, dedup, split, encode and pack one partition; write its shards, then its record.

    `drop` lists the positions of documents seen earlier in the corpus. None means they are
    not known yet: only repeats within the partition are dropped, the record is named by that
    guess (`key` is ignored), and the hashes are also cached at `hashes_dest`.
    """
    started = time.perf_counter()
    sp = worker_tokenizer(spec.tokenizer_path, spec.tokenizer_sha256)
    result = PartitionResult(index=part.index, key=key)
    tally = Tally()
    streams = _SplitStreams(sp, token_dtype(sp.get_piece_size()))
    hashes = _encode_documents(part, drop, spec, tally, streams, result)
    result.hashes = hashes
    token_streams = {split: streams.stream(split) for split in ("train", "val")}
    if drop is None:
        result.key = encode_key(source_key(part, spec.rules), find_duplicates([hashes])[0], spec)
        if hashes_dest:
            save_hashes(Path(hashes_dest), hashes, tally)
        _save_spans(Path(spec.out_dir) / SPANS / f"{result.key}.npz", streams, token_streams, spec.row_len)
    for split, stream in token_streams.items():
        _write_split(part.index, split, stream, spec, result)
    result.stats.update(tally.counts)
    result.stats["bytes_out"] += streams.bytes_out
    result.first = dict(tally.first)
    result.stats["seconds_in_workers"] = round(time.perf_counter() - started, 3)
    if result.key:
        write_json(Path(spec.out_dir) / PARTS / f"{result.key}.json", result.to_json())
    return result


def _encode_documents(
    part: Partition,
    drop: np.ndarray | None,
    spec: EncodeSpec,
    tally: Tally,
    streams: _SplitStreams,
    result: PartitionResult,
) -> np.ndarray:
    """Feed the partition's kept documents to `streams`; the hashes of all its documents, in order."""
    hashes: list[int] = []
    seen: set[int] = set()
    drop_set = set(np.asarray(drop).tolist()) if drop is not None else None
    for piece in part.pieces:
        for doc in read_documents(piece, spec.rules, tally):
            h = doc_hash(doc)
            hashes.append(h)
            repeated = (len(hashes) - 1 in drop_set) if drop_set is not None else h in seen
            seen.add(h)
            if repeated:
                result.stats["dropped_duplicate"] += 1
                continue
            split = "val" if is_val(h, spec.val_fraction) else "train"
            result.stats[f"docs_{split}"] += 1
            streams.add(split, doc, len(hashes) - 1)
    return np.array(hashes, np.uint64)


def _packed(n_tokens: int, row_len: int) -> int:
    """How many tokens of a stream of `n_tokens` the packed rows hold (see tasks.core.shards.pack_rows)."""
    n_rows = max(0, (n_tokens - 1) // (row_len - 1))
    return n_rows * (row_len - 1) + 1 if n_rows else 0


def _save_spans(dest: Path, streams: _SplitStreams, token_streams: dict[str, np.ndarray], row_len: int) -> None:
    arrays = {}
    for split, stream in token_streams.items():
        positions, lengths, sizes = streams.spans[split]
        arrays |= {
            f"{split}_positions": np.array(positions, np.int64),
            f"{split}_tokens": np.array(lengths, np.int64),
            f"{split}_bytes": np.array(sizes, np.int64),
            f"{split}_tail": stream[_packed(len(stream), row_len) :],
        }
    # read back only by this run, so an atomic rename without fsync is enough
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, dest)


def drop_repeats(guess: PartitionResult, drop: np.ndarray, spec: EncodeSpec, key: str) -> PartitionResult:
    """A first-pass partition without the documents at positions `drop` (which include those it
    dropped itself): its token streams are rebuilt from its shards and spans, the dropped
    documents' tokens cut out, and the rest packed again, so nothing is encoded twice. The
    shards are the same bytes as `encode_partition(part, drop, spec, key)` would write."""
    started = time.perf_counter()
    out = Path(spec.out_dir)
    result = PartitionResult(guess.index, key, stats=Counter(guess.stats), first=dict(guess.first), repacked=True)
    result.stats["tokens"] = result.stats["tokens_dropped_tail"] = 0
    with np.load(out / SPANS / f"{guess.key}.npz") as spans:
        for split in ("train", "val"):
            old = next((s for s in guess.shards if s["split"] == split), None)
            rows = read_rows(out / old["path"]) if old else None
            tail = spans[f"{split}_tail"]
            stream = tail if rows is None else np.concatenate([rows[0], rows[1:, 1:].reshape(-1), tail])
            gone = np.isin(spans[f"{split}_positions"], drop)
            result.stats[f"docs_{split}"] -= int(gone.sum())
            if not result.stats[f"docs_{split}"]:
                del result.stats[f"docs_{split}"]  # as a split no document reached is counted
            result.stats["dropped_duplicate"] += int(gone.sum())
            result.stats["bytes_out"] -= int(spans[f"{split}_bytes"][gone].sum())
            _write_split(guess.index, split, stream[np.repeat(~gone, spans[f"{split}_tokens"])], spec, result)
            if old and not any(s["split"] == split for s in result.shards):
                (out / old["path"]).unlink(missing_ok=True)  # too few tokens left for a row
    result.stats["seconds_in_workers"] += round(time.perf_counter() - started, 3)
    write_json(out / PARTS / f"{key}.json", result.to_json())
    return result


def _write_split(index: int, split: str, stream: np.ndarray, spec: EncodeSpec, result: PartitionResult) -> None:
    rows = pack_rows(stream, spec.row_len)
    result.stats["tokens"] += len(stream)
    result.stats["tokens_dropped_tail"] += len(stream) - (len(rows) * (spec.row_len - 1) + 1 if len(rows) else 0)
    if not len(rows):
        return
    meta = {"tokenizer_sha256": spec.tokenizer_sha256, "row_len": spec.row_len}
    result.shards.append(
        write_split(
            spec.out_dir,
            split,
            index,
            meta,
            len(rows),
            rows.size,
            lambda tmp, metadata: write_shard(tmp, rows, metadata),
        )
    )
