"""Arrow IPC token shards: packing, writing, and a zero-copy reader.

A shard is an uncompressed Arrow IPC (Feather v2) file with one fixed-size-list column,
`tokens`, whose rows each hold `row_len` token ids. Uncompressed IPC memory-maps without a
copy, so the training reader pages rows in from disk on demand. This module imports only
numpy and pyarrow, so a GPU box can read shards without the rest of the pipeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from numpy.lib.stride_tricks import as_strided

from tasks.core.spec import task_spec

TOKENS = "tokens"


def pack_rows(stream: np.ndarray, row_len: int) -> np.ndarray:
    """Cut a token stream into rows of `row_len` that overlap by one token.

    Row i is stream[i*(row_len-1) : i*(row_len-1) + row_len], so every next-token pair in the
    stream appears in exactly one row. The tail that cannot fill a row is dropped.
    """
    step = row_len - 1
    n_rows = max(0, (len(stream) - 1) // step)
    if n_rows == 0:
        return np.empty((0, row_len), dtype=stream.dtype)
    # A strided view of the overlapping windows, copied once: no (rows x row_len) index array.
    stream = np.ascontiguousarray(stream)
    item = stream.strides[0]
    return as_strided(stream, shape=(n_rows, row_len), strides=(step * item, item), writeable=False).copy()


def schema(row_len: int, dtype: np.dtype, metadata: dict[str, str]) -> pa.Schema:
    value_type = pa.uint16() if dtype == np.uint16 else pa.int32()
    return pa.schema(
        [pa.field(TOKENS, pa.list_(value_type, row_len), nullable=False)],
        metadata={k: str(v) for k, v in metadata.items()},
    )


def write_shard(path: Path, rows: np.ndarray, metadata: dict[str, str]) -> None:
    """Write rows (N, row_len) as one uncompressed IPC file at `path` (not atomic by itself)."""
    n, row_len = rows.shape
    flat = pa.array(np.ascontiguousarray(rows).reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(flat, row_len)
    table = pa.Table.from_arrays([column], schema=schema(row_len, rows.dtype, metadata))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=65536)


def read_rows(path: Path) -> np.ndarray:
    """All rows of one shard as a read-only (N, row_len) array memory-mapped from disk."""
    source = pa.memory_map(str(path), "r")
    table = pa.ipc.open_file(source).read_all()
    row_len = table.schema.field(TOKENS).type.list_size
    parts = [chunk.flatten().to_numpy(zero_copy_only=True) for chunk in table.column(TOKENS).chunks]
    if not parts:
        return np.empty((0, row_len), dtype=table.schema.field(TOKENS).type.value_type.to_pandas_dtype())
    flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return flat.reshape(-1, row_len)


@dataclass
class ShardSet:
    """The rows of one split of a manifest, addressable by a global row index."""

    shards: list[np.ndarray]
    row_len: int

    @classmethod
    def open(cls, manifest_path: Path, split: str) -> ShardSet:
        manifest = json.loads(Path(manifest_path).read_text())
        root = Path(manifest_path).parent
        arrays = [read_rows(root / s["path"]) for s in manifest["shards"] if s["split"] == split]
        return cls(shards=[a for a in arrays if len(a)], row_len=manifest["row_len"])

    def __post_init__(self) -> None:
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows at global `indices`, gathered into a new writable int64 array."""
        return gather_rows(self.shards, self.offsets, np.asarray(indices), self.row_len)


def gather_rows(shards: list[np.ndarray], offsets: np.ndarray, indices: np.ndarray, width: int) -> np.ndarray:
    """The rows at global `indices` of shards that start at `offsets`, as a new int64 array.
    The shards stay memory-mapped and read-only; only the rows asked for are copied."""
    out = np.empty((len(indices), width), dtype=np.int64)
    which = np.searchsorted(offsets, indices, side="right") - 1
    for k, (shard, local) in enumerate(zip(which, indices - offsets[which])):
        out[k] = shards[shard][local]
    return out


# Labelled shards (task `classify`): one row per document instead of a packed stream.
# Columns: `tokens` (fixed-size list of `max_len` ids, right-padded with PAD_ID past the
# document's end), `length` (int32, the real tokens in the row, 1..max_len) and `label`
# (int32, an index into the manifest's `labels`). Same file format and atomic writing as
# token shards; the schema metadata carries tokenizer_sha256, row_len (= max_len) and split.
LENGTH, LABEL = "length", "label"
PAD_ID = 0


def labelled_schema(max_len: int, dtype: np.dtype, metadata: dict[str, str]) -> pa.Schema:
    value_type = pa.uint16() if dtype == np.uint16 else pa.int32()
    return pa.schema(
        [
            pa.field(TOKENS, pa.list_(value_type, max_len), nullable=False),
            pa.field(LENGTH, pa.int32(), nullable=False),
            pa.field(LABEL, pa.int32(), nullable=False),
        ],
        metadata={k: str(v) for k, v in metadata.items()},
    )


def write_labelled_shard(
    path: Path, tokens: np.ndarray, lengths: np.ndarray, labels: np.ndarray, metadata: dict[str, str]
) -> None:
    """Write (N, max_len) padded tokens with their lengths and label ids (not atomic by itself)."""
    n, max_len = tokens.shape
    if len(lengths) != n or len(labels) != n:
        raise ValueError(f"{n} token rows but {len(lengths)} lengths and {len(labels)} labels")
    column = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(tokens).reshape(-1)), max_len)
    table = pa.Table.from_arrays(
        [column, pa.array(np.asarray(lengths, np.int32)), pa.array(np.asarray(labels, np.int32))],
        schema=labelled_schema(max_len, tokens.dtype, metadata),
    )
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=65536)


def read_labelled(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens (N, max_len), lengths (N,), labels (N,)) of one labelled shard, memory-mapped."""
    tokens = read_rows(path)
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    # Array.to_numpy per chunk: zero-copy, and unlike ChunkedArray.to_numpy it never imports pandas.
    lengths, labels = (_column(table, name) for name in (LENGTH, LABEL))
    return tokens, lengths, labels


def _column(table: pa.Table, name: str) -> np.ndarray:
    chunks = [chunk.to_numpy(zero_copy_only=True) for chunk in table.column(name).chunks]
    if not chunks:
        return np.empty(0, np.int32)
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


@dataclass
class LabelledShardSet:
    """The documents of one split of a classification manifest, addressable by a global index."""

    tokens: list[np.ndarray]
    lengths: np.ndarray
    labels: np.ndarray
    max_len: int
    label_names: list[str]

    @classmethod
    def open(cls, manifest_path: Path, split: str) -> LabelledShardSet:
        manifest = json.loads(Path(manifest_path).read_text())
        if not task_spec(manifest.get("task")).labelled:
            raise ValueError(f"{manifest_path} holds language-model shards, not labelled ones")
        root = Path(manifest_path).parent
        parts = [read_labelled(root / s["path"]) for s in manifest["shards"] if s["split"] == split]
        parts = [p for p in parts if len(p[0])]
        lengths = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.int32)
        labels = np.concatenate([p[2] for p in parts]) if parts else np.empty(0, np.int32)
        return cls([p[0] for p in parts], lengths, labels, manifest["row_len"], list(manifest["labels"]))

    def __post_init__(self) -> None:
        self.offsets = np.cumsum([0] + [len(t) for t in self.tokens])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, lengths, labels) at global `indices`, as new writable int64 arrays."""
        indices = np.asarray(indices)
        tokens = gather_rows(self.tokens, self.offsets, indices, self.max_len)
        return tokens, self.lengths[indices].astype(np.int64), self.labels[indices].astype(np.int64)


def shard_name(split: str, index: int) -> str:
    """The file of one split of one partition: `train-00003.arrow`."""
    return f"{split}-{index:05d}.arrow"


def write_split(out_dir: Path, split: str, index: int, meta: dict, rows: int, tokens: int, write) -> dict:
    """Write one split of one partition atomically with `write(tmp_path, metadata)` and return its
    manifest entry. `meta` is what the schema metadata records besides the split."""
    from tasks.core.atomic import sha256_file, write_with

    name = shard_name(split, index)
    dest = Path(out_dir) / name
    metadata = {**meta, "split": split}
    write_with(dest, lambda tmp: write(tmp, metadata))
    return {"path": name, "split": split, "rows": int(rows), "tokens": int(tokens), "sha256": sha256_file(dest)}
