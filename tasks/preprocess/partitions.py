"""Cut a corpus into partitions of bounded size that stay put when the corpus grows.

Large uncompressed line-based files are split into byte ranges, large Parquet files into
ranges of row groups (read from the file's footer); small files are grouped.
Where a group ends depends only on each file's own path and size (a file of n bytes ends a
group with probability n / target, decided by a hash of its path), not on its neighbours,
so adding or changing a file moves the boundaries of its own partition only. Partitions
are capped at four times the target (a cap that rarely binds, since a cut forced by it can
shift the next partition's start too). The plan depends only on the file listing, never on the
number of workers, which is what makes the shards identical whatever the cluster size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from data_catalog.listing import SourceFile
from tasks.preprocess.sources import Piece, file_format, is_splittable, open_raw

MAX_OVER_TARGET = 4


@dataclass(frozen=True)
class Partition:
    index: int
    pieces: tuple[Piece, ...]
    nbytes: int
    identity: tuple[str, ...] = ()  # each piece's file version (path, range, size, mtime, etag)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(p.path for p in self.pieces)


def split_file(f: SourceFile, fmt: str, target_bytes: int) -> list[tuple[Piece, int]]:
    """The file as (piece, bytes) pairs: byte ranges (or Parquet row-group ranges) of about
    `target_bytes` when it can be split."""
    if f.size > target_bytes and file_format(f.path, fmt) == "parquet":
        return split_parquet(f, target_bytes)
    if f.size <= target_bytes or not is_splittable(f.path, file_format(f.path, fmt)):
        return [(Piece(f.path), f.size)]
    n = -(-f.size // target_bytes)
    bounds = [f.size * i // n for i in range(n + 1)]
    return [(Piece(f.path, lo, None if hi == f.size else hi), hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:])]


def split_parquet(f: SourceFile, target_bytes: int) -> list[tuple[Piece, int]]:
    """Consecutive row groups of about `target_bytes` each (the file's size shared among its row
    groups by their compressed size); one piece when the footer cannot be read, so the reader
    reports the file."""
    weights = row_group_bytes(f.path)
    if len(weights) < 2 or not sum(weights):
        return [(Piece(f.path), f.size)]
    sizes = [f.size * w // sum(weights) for w in weights]
    pieces: list[tuple[Piece, int]] = []
    start, acc = 0, 0
    for i, n in enumerate(sizes):
        acc += n
        if acc >= target_bytes or i == len(sizes) - 1:
            pieces.append((Piece(f.path, start, None if i == len(sizes) - 1 else i + 1), acc))
            start, acc = i + 1, 0
    return pieces


def row_group_bytes(path: str) -> list[int]:
    """The compressed bytes of each row group of a Parquet file; [] when it is not readable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open_raw(path) as raw:
            meta = pq.ParquetFile(raw).metadata
    except (OSError, pa.ArrowException):
        return []
    return [
        sum(meta.row_group(g).column(c).total_compressed_size for c in range(meta.num_columns))
        for g in range(meta.num_row_groups)
    ]


def plan_partitions(files: list[SourceFile], fmt: str, target_bytes: int) -> list[Partition]:
    """Partitions, in file order, of about `target_bytes` each (at most 4x that, or one big piece)."""
    parts: list[Partition] = []
    batch: list[tuple[Piece, int, str]] = []

    def cut() -> None:
        if batch:
            pieces = tuple(p for p, _, _ in batch)
            parts.append(Partition(len(parts), pieces, sum(n for _, n, _ in batch), tuple(i for _, _, i in batch)))
            batch.clear()

    for f in files:
        for piece, nbytes in split_file(f, fmt, target_bytes):
            size = sum(n for _, n, _ in batch)
            if nbytes >= target_bytes or size + nbytes > MAX_OVER_TARGET * target_bytes:
                cut()
            batch.append((piece, nbytes, _identity(f, piece)))
            if nbytes >= target_bytes or _ends_group(piece, nbytes, target_bytes):
                cut()
    cut()
    return parts


def _ends_group(piece: Piece, nbytes: int, target_bytes: int) -> bool:
    draw = int.from_bytes(hashlib.blake2b(f"{piece.path}:{piece.start}".encode(), digest_size=8).digest(), "little")
    return draw / 2**64 < nbytes / target_bytes


def _identity(f: SourceFile, piece: Piece) -> str:
    return json.dumps([f.path, piece.start, piece.end, f.size, f.mtime_ns, f.etag])
