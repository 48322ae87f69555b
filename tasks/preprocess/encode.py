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
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tasks.core.atomic import write_bytes, write_json
from tasks.core.manifest import FORMAT, content_key
from tasks.core.shards import pack_rows, read_rows, write_shard, write_split
from tasks.core.tokenizer import token_dtype, worker_tokenizer
from tasks.preprocess.documents import DocRules, Tally, doc_hash, is_val, read_placed
from tasks.preprocess.partitions import Partition
from tasks.preprocess.screen import Screen, Screening
from tasks.preprocess.streams import SplitStreams, save_spans

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
    screen: Screen | None = None  # quality filters, near-duplicate signatures, drop samples


@dataclass
class PartitionResult:
    index: int
    key: str = ""
    shards: list[dict] = field(default_factory=list)
    stats: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)  # where each drop reason was first seen
    reused: bool = False
    repacked: bool = False  # cut from a first pass's shards by drop_repeats, not encoded
    samples: dict[str, list[dict]] = field(default_factory=dict)  # documents dropped by a filter, per reason
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
            "samples": self.samples,
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
            obj.get("samples", {}),
        )


@dataclass
class HashResult:
    index: int
    hashes: np.ndarray
    tally: Tally


def source_key(part: Partition, rules: DocRules) -> str:
    """Names a partition's input: its pieces' file versions and the reading rules."""
    return content_key(FORMAT, "source", list(part.identity), asdict(rules))


def input_key(part: Partition, rules: DocRules, screen: Screen | None = None) -> str:
    """Names the documents a partition keeps and what is cached of them (hashes, signatures):
    its input and, when documents are screened, the filters and MinHash settings."""
    skey = source_key(part, rules)
    identity = screen.identity() if screen else None
    return skey if identity is None else content_key(FORMAT, "screened", skey, identity)


def encode_key(skey: str, drops: np.ndarray, spec: EncodeSpec, near: np.ndarray | None = None) -> str:
    """Names a partition's shards: its input, which documents dedup drops (and which of them as
    near-duplicates), the tokenizer and packing."""
    dropped = content_key(np.asarray(drops, dtype=np.int64).tolist())
    parts = [FORMAT, "encode", skey, dropped, spec.tokenizer_sha256, spec.row_len, spec.val_fraction]
    if near is not None and len(near):
        parts.append(content_key(["near", np.asarray(near, dtype=np.int64).tolist()]))
    return content_key(*parts)


def hash_partition(
    part: Partition, rules: DocRules, dest: str | None = None, screen: Screen | None = None
) -> HashResult:
    """The 64-bit hash of every kept document of the partition, in reading order; cached at `dest`
    with the documents' signatures when near-duplicates are searched."""
    tally = Tally()
    screening = Screening(screen, signatures=bool(dest))
    hashes = []
    for piece in part.pieces:
        for doc, where in read_placed(piece, rules, tally):
            if not screening.rejects(doc, where):
                hashes.append(doc_hash(doc))
                screening.add(doc)
    tally.counts.update(screening.stats)
    result = HashResult(part.index, np.array(hashes, np.uint64), tally)
    if dest:
        save_hashes(Path(dest), result.hashes, tally, screening.signatures())
    return result


def save_hashes(dest: Path, hashes: np.ndarray, tally: Tally, signatures: np.ndarray | None = None) -> None:
    buf = io.BytesIO()
    arrays = {"hashes": hashes, "tally": np.frombuffer(json.dumps([tally.counts, tally.first]).encode(), np.uint8)}
    np.savez(buf, **arrays, **({"signatures": signatures} if signatures is not None else {}))
    write_bytes(dest, buf.getvalue())


def load_signatures(path: Path) -> np.ndarray:
    with np.load(path) as npz:
        return npz["signatures"]


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


def encode_partition(
    part: Partition,
    drop: np.ndarray | None,
    spec: EncodeSpec,
    key: str = "",
    hashes_dest: str | None = None,
    near: np.ndarray | None = None,
) -> PartitionResult:
    """Read, screen, dedup, split, encode and pack one partition; write its shards, then its record.

    `drop` lists the positions of documents seen earlier in the corpus (`near`: those of them
    dropped as near-duplicates). None means they are not known yet: only repeats within the
    partition are dropped, the record is named by that guess (`key` is ignored), and the hashes
    (and signatures) are also cached at `hashes_dest`.
    """
    started = time.perf_counter()
    sp = worker_tokenizer(spec.tokenizer_path, spec.tokenizer_sha256)
    result = PartitionResult(index=part.index, key=key)
    tally = Tally()
    streams = SplitStreams(sp, token_dtype(sp.get_piece_size()))
    screening = Screening(spec.screen, signatures=drop is None and bool(hashes_dest))
    hashes = _encode_documents(part, drop, near, spec, tally, streams, result, screening)
    tally.counts.update(screening.stats)
    result.hashes, result.samples = hashes, screening.final_samples()
    token_streams = {split: streams.stream(split) for split in ("train", "val")}
    if drop is None:
        result.key = encode_key(input_key(part, spec.rules, spec.screen), find_duplicates([hashes])[0], spec)
        if hashes_dest:
            save_hashes(Path(hashes_dest), hashes, tally, screening.signatures())
        save_spans(Path(spec.out_dir) / SPANS / f"{result.key}.npz", streams, token_streams, spec.row_len)
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
    near: np.ndarray | None,
    spec: EncodeSpec,
    tally: Tally,
    streams: SplitStreams,
    result: PartitionResult,
    screening: Screening,
) -> np.ndarray:
    """Feed the partition's kept documents to `streams`; the hashes of all the documents that
    pass the filters, in order."""
    hashes: list[int] = []
    seen: set[int] = set()
    drop_set = set(np.asarray(drop).tolist()) if drop is not None else None
    near_set = set(np.asarray(near).tolist()) if near is not None else set()
    for piece in part.pieces:
        for doc, where in read_placed(piece, spec.rules, tally):
            if screening.rejects(doc, where):
                continue
            h = doc_hash(doc)
            hashes.append(h)
            screening.add(doc)
            repeated = (len(hashes) - 1 in drop_set) if drop_set is not None else h in seen
            seen.add(h)
            if repeated:
                reason = "near_duplicate" if len(hashes) - 1 in near_set else "duplicate"
                result.stats[f"dropped_{reason}"] += 1
                result.stats[f"bytes_dropped_{reason}"] += len(doc.encode("utf-8"))
                continue
            split = "val" if is_val(h, spec.val_fraction) else "train"
            result.stats[f"docs_{split}"] += 1
            streams.add(split, doc, len(hashes) - 1)
    return np.array(hashes, np.uint64)


def drop_repeats(
    guess: PartitionResult, drop: np.ndarray, spec: EncodeSpec, key: str, near: np.ndarray | None = None
) -> PartitionResult:
    """A first-pass partition without the documents at positions `drop` (which include those it
    dropped itself): its token streams are rebuilt from its shards and spans, the dropped
    documents' tokens cut out, and the rest packed again, so nothing is encoded twice. The
    shards are the same bytes as `encode_partition(part, drop, spec, key)` would write."""
    started = time.perf_counter()
    out = Path(spec.out_dir)
    result = PartitionResult(
        guess.index, key, stats=Counter(guess.stats), first=dict(guess.first), repacked=True, samples=guess.samples
    )
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
            gone_near = gone & np.isin(spans[f"{split}_positions"], near if near is not None else [])
            for reason, mask in (("duplicate", gone & ~gone_near), ("near_duplicate", gone_near)):
                if mask.any():
                    result.stats[f"dropped_{reason}"] += int(mask.sum())
                    result.stats[f"bytes_dropped_{reason}"] += int(spans[f"{split}_bytes"][mask].sum())
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
