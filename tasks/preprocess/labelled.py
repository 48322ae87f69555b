"""The per-partition work of labelled preprocessing (task `classify`), and the pure choices
the client makes between its two passes.

Pass one (`scan_partition`) reads a partition's labelled documents and returns only their
hashes and labels. The client then dedups across the corpus, fixes the label set and picks a
stratified train/val split (`select_documents`), all from those small arrays. Pass two
(`encode_labelled_partition`) reads the partition again, encodes the documents the client
kept, truncates and pads them to `max_len`, and writes one shard per split atomically.
Workers do not know who runs them: the same functions run serially in tests or on Dask.
The quality filters (data.quality) apply here as to language-model corpora, each drop counted
by reason; near-duplicate removal (data.near_dup) is for language-model corpora only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from tasks.core.shards import PAD_ID, write_labelled_shard, write_split
from tasks.core.tokenizer import token_dtype, worker_tokenizer
from tasks.preprocess.documents import DocRules, LabelRules, Tally, doc_hash, read_labelled
from tasks.preprocess.partitions import Partition
from tasks.preprocess.quality import failing_filter
from tokenmill.data_quality import QualityConfig
from tokenmill.errors import TokenmillError

ENCODE_BATCH_DOCS = 512
SPLITS = ("train", "val")
# A classifier's gate compares macro-F1 on the val split, so the split must be large enough to
# mean something: at least 10% and at least 200 documents, but never more than a quarter of
# the corpus for the sake of those 200 (a larger data.val_fraction is honoured as set).
MIN_VAL_FRACTION, MIN_VAL_DOCS, MAX_FLOOR_FRACTION = 0.10, 200, 0.25
SPLIT_RULE = "val>=max(10%,min(200,25%))"  # enters the labelled shards' cache key


@dataclass(frozen=True)
class LabelledSource:
    """How to read a partition's labelled documents; `file_labels` maps a path to its
    directory label (directory-per-class corpora only)."""

    rules: DocRules
    labels: LabelRules
    file_labels: tuple[tuple[str, str | None], ...] = ()
    quality: QualityConfig | None = None  # only when some filter is on

    def documents(self, part: Partition, tally: Tally, seen: dict | None = None) -> Iterator[tuple[str, str]]:
        by_path = dict(self.file_labels)
        for piece in part.pieces:
            for doc, label in read_labelled(piece, self.rules, self.labels, tally, by_path.get(piece.path), seen):
                reason = failing_filter(doc, self.quality) if self.quality else None
                if reason is None:
                    yield doc, label
                else:
                    tally.note(f"dropped_{reason}", piece.path)


@dataclass
class ScanResult:
    """A partition's kept documents in reading order: hash and label, plus what was dropped."""

    index: int
    hashes: np.ndarray  # (n,) uint64
    codes: np.ndarray  # (n,) int32 index into `names`
    names: list[str]
    tally: Tally
    seen: dict[str, list[int]] = field(default_factory=dict)  # path -> [records, records with a label]


def scan_partition(part: Partition, source: LabelledSource) -> ScanResult:
    tally, seen = Tally(), {}
    names: dict[str, int] = {}
    hashes, codes = [], []
    for doc, label in source.documents(part, tally, seen):
        hashes.append(doc_hash(doc))
        codes.append(names.setdefault(label, len(names)))
    return ScanResult(part.index, np.array(hashes, np.uint64), np.array(codes, np.int32), list(names), tally, seen)


@dataclass
class Selection:
    """The client's decisions, per partition in reading order: each document's label id (-1:
    dropped as a duplicate) and whether it goes to val."""

    names: list[str]
    label_ids: list[np.ndarray]
    val: list[np.ndarray]
    tally: Tally

    def counts(self, split: str) -> dict[str, int]:
        ids = np.concatenate(self.label_ids)
        val = np.concatenate(self.val)
        chosen = ids[(ids >= 0) & (val == (split == "val"))]
        return {name: int(n) for name, n in zip(self.names, np.bincount(chosen, minlength=len(self.names)))}


def select_documents(scans: list[ScanResult], declared: list[str] | None, val_fraction: float) -> Selection:
    """Dedup by text across the corpus, fix the label set (declared, else the sorted labels
    kept) and split (`val_fraction`, raised by `val_fraction_for`); the decisions are cut back
    into per-partition arrays."""
    observed, hashes, labels = _flatten(scans)
    repeat, tally = dedup(hashes, labels, observed)
    names = list(declared) if declared else sorted({observed[i] for i in np.unique(labels[~repeat])})
    to_id = np.array([names.index(n) if n in names else -1 for n in observed] + [-1], np.int32)
    ids = np.where(repeat, -1, to_id[labels])
    val = stratified_val(hashes, ids, len(names), val_fraction_for(val_fraction, int((ids >= 0).sum())))
    bounds = np.cumsum([0] + [len(s.hashes) for s in scans])
    cut = lambda a: [a[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]  # noqa: E731
    return Selection(names, cut(ids), cut(val), tally)


def _flatten(scans: list[ScanResult]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The sorted labels seen, and every document's hash and index into them, in corpus order."""
    observed = sorted({n for s in scans for n in s.names})
    index = {n: i for i, n in enumerate(observed)}
    hashes = np.concatenate([np.empty(0, np.uint64), *(s.hashes for s in scans)])
    labels = np.concatenate(
        [np.empty(0, np.int32), *(np.array([index[n] for n in s.names] + [0], np.int32)[s.codes] for s in scans)]
    )
    return observed, hashes, labels


def dedup(hashes: np.ndarray, labels: np.ndarray, names: list[str]) -> tuple[np.ndarray, Tally]:
    """Which documents repeat an earlier text (the first one wins), with the repeats counted:
    as duplicates, or as label conflicts when the earlier copy has another label."""
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    winner = first[inverse]
    repeat = np.arange(len(hashes)) != winner
    conflict = repeat & (labels != labels[winner])
    tally = Tally()
    tally.counts["dropped_duplicate"] = int((repeat & ~conflict).sum())
    if conflict.any():
        k = int(np.flatnonzero(conflict)[0])
        tally.counts["dropped_label_conflict"] = int(conflict.sum())
        tally.first["dropped_label_conflict"] = (
            f"a text labelled '{names[labels[winner[k]]]}' repeated as '{names[labels[k]]}'"
        )
    return repeat, tally


def val_fraction_for(requested: float, n_docs: int) -> float:
    """The val fraction a classifier's split uses: `requested` (data.val_fraction), raised to
    the floor that keeps the gate meaningful (see MIN_VAL_FRACTION, MIN_VAL_DOCS)."""
    floor_for_docs = min(MIN_VAL_DOCS / n_docs, MAX_FLOOR_FRACTION) if n_docs else 0.0
    return max(requested, MIN_VAL_FRACTION, floor_for_docs)


def stratified_val(hashes: np.ndarray, ids: np.ndarray, n_classes: int, val_fraction: float) -> np.ndarray:
    """Within each class, the documents of lowest hash go to val: round(val_fraction * n) of
    them, at least one when the class has two or more, never all. Independent of the order
    documents were read in, so of the partitioning and the number of workers."""
    val = np.zeros(len(ids), dtype=bool)
    for c in range(n_classes):
        members = np.flatnonzero(ids == c)
        if len(members) < 2:
            continue
        k = min(len(members) - 1, max(1, round(val_fraction * len(members))))
        val[members[np.argsort(hashes[members], kind="stable")[:k]]] = True
    return val


@dataclass(frozen=True)
class LabelledEncodeSpec:
    """Everything a worker needs to encode its partition's kept documents."""

    source: LabelledSource
    tokenizer_path: str
    tokenizer_sha256: str
    max_len: int
    out_dir: str


@dataclass
class _Rows:
    """One split's padded rows, filled batch by batch."""

    docs: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    row_labels: list[int] = field(default_factory=list)


def encode_labelled_partition(
    part: Partition, label_ids: np.ndarray, val: np.ndarray, spec: LabelledEncodeSpec
) -> dict:
    """Encode, truncate and pad the partition's kept documents; write `train-`/`val-NNNNN.arrow`.
    Returns {index, shards, stats}. Reads exactly the documents the scan read, or stops."""
    sp = worker_tokenizer(spec.tokenizer_path, spec.tokenizer_sha256)
    dtype = token_dtype(sp.get_piece_size())
    rows = {split: _Rows() for split in SPLITS}
    stats: Counter = Counter()
    position = 0
    for doc, _ in spec.source.documents(part, Tally()):
        if position >= len(label_ids):
            raise _changed(part)
        if label_ids[position] >= 0:
            r = rows["val" if val[position] else "train"]
            r.docs.append(doc)
            r.labels.append(int(label_ids[position]))
            if len(r.docs) >= ENCODE_BATCH_DOCS:
                _encode_batch(sp, r, spec.max_len, dtype, stats)
        position += 1
    if position != len(label_ids):
        raise _changed(part)
    shards = []
    for split in SPLITS:
        _encode_batch(sp, rows[split], spec.max_len, dtype, stats)
        if rows[split].lengths:
            shards.append(_write_split(part.index, split, rows[split], spec, dtype))
            stats[f"docs_{split}"] += len(rows[split].lengths)
    return {"index": part.index, "shards": shards, "stats": dict(stats)}


def _changed(part: Partition) -> TokenmillError:
    return TokenmillError(
        f"files of partition {part.index} ({part.paths[0]}, ...) changed while preprocessing; run again"
    )


def _encode_batch(sp, r: _Rows, max_len: int, dtype, stats: Counter) -> None:
    if not r.docs:
        return
    for doc, ids in zip(r.docs, sp.encode(r.docs, num_threads=1)):
        n = len(ids)
        if n > max_len:
            stats["docs_truncated"] += 1
            stats["tokens_truncated"] += n - max_len
        row = np.full(max_len, PAD_ID, dtype=dtype)
        row[: min(n, max_len)] = ids[:max_len]
        r.tokens.append(row)
        r.lengths.append(min(n, max_len))
        stats["tokens"] += min(n, max_len)
        stats["bytes_out"] += len(doc.encode("utf-8"))
    r.row_labels += r.labels
    r.docs.clear()
    r.labels.clear()


def _write_split(index: int, split: str, r: _Rows, spec: LabelledEncodeSpec, dtype) -> dict:
    tokens = np.stack(r.tokens).astype(dtype, copy=False)  # (N, max_len)
    meta = {"tokenizer_sha256": spec.tokenizer_sha256, "row_len": spec.max_len}
    return write_split(
        spec.out_dir,
        split,
        index,
        meta,
        len(r.lengths),
        sum(r.lengths),
        lambda tmp, metadata: write_labelled_shard(tmp, tokens, np.array(r.lengths), np.array(r.row_labels), metadata),
    )
