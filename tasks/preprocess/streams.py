"""Token streams of a partition being encoded: documents batched per split into SentencePiece
calls, and where each document's tokens lie (`spans/<key>.npz`), so a first-pass partition can
later be repacked without some documents instead of being encoded again (encode.drop_repeats).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

ENCODE_BATCH_DOCS = 1024
ENCODE_BATCH_CHARS = 1 << 20


class SplitStreams:
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


def _packed(n_tokens: int, row_len: int) -> int:
    """How many tokens of a stream of `n_tokens` the packed rows hold (see tasks.core.shards.pack_rows)."""
    n_rows = max(0, (n_tokens - 1) // (row_len - 1))
    return n_rows * (row_len - 1) + 1 if n_rows else 0


def save_spans(dest: Path, streams: SplitStreams, token_streams: dict[str, np.ndarray], row_len: int) -> None:
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
