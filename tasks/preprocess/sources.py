"""Read the raw records of one piece of a corpus file, in bounded memory.

A piece is a whole file or, for large uncompressed line-based files (lines, jsonl), a byte
range: it owns every line that starts inside it, so ranges cut at any byte still give each
line to exactly one piece. A piece of a Parquet file is a range of its row groups. Files are
local paths or fsspec URLs, decompressed by extension (.gz, .bz2, .zst). No record is ever
longer than `limit` bytes in memory: a longer one is skipped in chunks and reported as `TooLong`.

    for record in read_records(Piece("/data/a.jsonl.gz"), "jsonl", limit=8_000_000):
        ...
"""

from __future__ import annotations

import bz2
import gzip
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from data_catalog.listing import is_url

COMPRESSED = (".gz", ".bz2", ".zst")
SPLITTABLE = ("lines", "jsonl")
BINARY_SNIFF_BYTES = 8192
SKIP_CHUNK = 1 << 20


@dataclass(frozen=True)
class Piece:
    """A file, or the byte range [start, end) of one (for Parquet: the row groups [start, end)).
    `end` None means to the end of the file."""

    path: str
    start: int = 0
    end: int | None = None


@dataclass(frozen=True)
class Record:
    """One raw unit of a file: the bytes of a document (or JSON line), or text from Parquet
    (with the row's label when a label column was asked for)."""

    data: bytes | str | None
    where: str  # "file:line", "file@byte", or "file" for a whole-file record
    label: str | int | None = None


@dataclass(frozen=True)
class TooLong:
    where: str


@dataclass(frozen=True)
class FileProblem:
    """Why a whole file (or piece) yields nothing: 'empty', 'binary', 'unreadable',
    'missing_column', or for a Parquet label column 'missing_label_column' or 'bad_label_type'."""

    reason: str
    where: str


def file_format(path: str, declared: str) -> str:
    """The entry's format, or for `auto` the one the file's extension implies."""
    if declared != "auto":
        return declared
    name = strip_compression(path).lower()
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    return "text"


def strip_compression(path: str) -> str:
    for ext in COMPRESSED:
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def is_splittable(path: str, fmt: str) -> bool:
    return fmt in SPLITTABLE and not path.endswith(COMPRESSED)


def open_raw(path: str) -> BinaryIO:
    if is_url(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def open_stream(path: str) -> BinaryIO:
    """A buffered binary stream of the file's content, decompressed by extension."""
    raw = open_raw(path)
    if path.endswith(".gz"):
        return io.BufferedReader(gzip.GzipFile(fileobj=raw))
    if path.endswith(".bz2"):
        return io.BufferedReader(bz2.BZ2File(raw))
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)


def read_records(
    piece: Piece, fmt: str, limit: int, column: str = "text", label_column: str | None = None
) -> Iterator[Record | TooLong | FileProblem]:
    """The records of a piece in file order, with problems reported in line. `column`: Parquet's
    text column; `label_column`: Parquet's label column, read into each Record's label."""
    if fmt == "parquet":
        yield from _parquet_records(piece, limit, column, label_column)
        return
    try:
        with open_stream(piece.path) as f:
            head = f.peek(BINARY_SNIFF_BYTES)[:BINARY_SNIFF_BYTES] if piece.start == 0 else _head(piece.path)
            if b"\0" in head:
                if piece.start == 0:
                    yield FileProblem("binary", piece.path)
                return
            if piece.start == 0 and not head:
                yield FileProblem("empty", piece.path)
                return
            if fmt == "text":
                yield from _whole(f, piece.path, limit)
            elif fmt == "paragraphs":
                yield from _paragraphs(f, piece.path, limit)
            else:
                yield from _lines(f, piece, limit)
    except _read_errors() as exc:  # truncated gzip, a bad zstd frame, a vanished file
        yield FileProblem("unreadable", f"{piece.path} ({type(exc).__name__}: {exc})")


def _read_errors() -> tuple[type[BaseException], ...]:
    try:
        from zstandard import ZstdError
    except ImportError:
        return (OSError, EOFError)
    return (OSError, EOFError, ZstdError)


def _head(path: str) -> bytes:
    with open_stream(path) as f:
        return f.read(BINARY_SNIFF_BYTES)


def _whole(f: BinaryIO, path: str, limit: int) -> Iterator[Record | TooLong]:
    data = f.read(limit + 1)
    if len(data) > limit:
        yield TooLong(path)
    else:
        yield Record(data, path)


def _bounded_line(f: BinaryIO, limit: int) -> tuple[bytes | None, int]:
    """The next line without its newline (None when too long, skipped), and the bytes consumed."""
    line = f.readline(limit + 1)
    if len(line) <= limit or line.endswith(b"\n"):
        return line, len(line)
    consumed = len(line)
    while line and not line.endswith(b"\n"):
        line = f.readline(SKIP_CHUNK)
        consumed += len(line)
    return None, consumed


def _lines(f: BinaryIO, piece: Piece, limit: int) -> Iterator[Record | TooLong]:
    pos = piece.start
    if pos > 0:
        f.seek(pos - 1)
        _, consumed = _bounded_line(f, 0)  # finish the line that straddles the start: it is the previous piece's
        pos += consumed - 1
    number = 0
    while piece.end is None or pos < piece.end:
        line, consumed = _bounded_line(f, limit)
        if not consumed:
            return
        number += 1
        where = f"{piece.path}:{number}" if piece.start == 0 else f"{piece.path}@{pos}"
        pos += consumed
        if line is None:
            yield TooLong(where)
            continue
        yield Record(line.removesuffix(b"\n").removesuffix(b"\r"), where)


def _paragraphs(f: BinaryIO, path: str, limit: int) -> Iterator[Record | TooLong]:
    buf: list[bytes] = []
    size, number, start, too_long = 0, 0, 1, False
    while True:
        line, consumed = _bounded_line(f, limit)
        number += 1
        blank = consumed == 0 or (line is not None and not line.strip(b"\r\n"))
        if blank:
            if too_long:
                yield TooLong(f"{path}:{start}")
            elif buf:
                yield Record(b"".join(buf).rstrip(b"\r\n"), f"{path}:{start}")
            buf, size, too_long, start = [], 0, False, number + 1
            if not consumed:
                return
            continue
        size += consumed
        if line is None or size > limit:
            too_long, buf = True, []
        elif not too_long:
            buf.append(line)


def _parquet_records(
    piece: Piece, limit: int, column: str, label_column: str | None
) -> Iterator[Record | TooLong | FileProblem]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        raw = open_raw(piece.path)
        pf = pq.ParquetFile(raw)
    except (OSError, pa.ArrowException) as exc:
        if piece.start == 0:
            yield FileProblem("unreadable", f"{piece.path} ({type(exc).__name__}: {exc})")
        return
    with raw:
        problem = _parquet_problem(pf, piece.path, column, label_column)
        if problem is not None:
            if piece.start == 0 or problem.reason != "missing_column":  # a missing text column counts once per file
                yield problem
            return
        yield from _parquet_rows(pf, piece, limit, column, label_column)


def _parquet_problem(pf, path: str, column: str, label_column: str | None) -> FileProblem | None:
    import pyarrow as pa

    schema = pf.schema_arrow
    names = schema.names
    if column not in names:
        return FileProblem("missing_column", f"{path} has no column '{column}' (columns: {', '.join(names)})")
    if label_column is not None and label_column not in names:
        return FileProblem(
            "missing_label_column", f"{path} has no column '{label_column}' (columns: {', '.join(names)})"
        )
    if label_column is not None:
        kind = schema.field(label_column).type
        value = kind.value_type if pa.types.is_dictionary(kind) else kind
        if not (pa.types.is_string(value) or pa.types.is_large_string(value) or pa.types.is_integer(value)):
            return FileProblem("bad_label_type", f"{path}: label column '{label_column}' has type {kind}")
    if pf.metadata.num_rows == 0:
        return FileProblem("empty", path)
    return None


def parquet_row_groups(piece: Piece, n_groups: int) -> range:
    return range(piece.start, n_groups if piece.end is None else min(piece.end, n_groups))


def _parquet_rows(pf, piece: Piece, limit: int, column: str, label_column: str | None) -> Iterator[Record | TooLong]:
    """Rows of the text column; a row whose value is not a string is a Record with data None.
    Rows are numbered from the start of the file, whichever row groups the piece holds."""
    groups = parquet_row_groups(piece, pf.metadata.num_row_groups)
    if not groups:
        return
    row = sum(pf.metadata.row_group(i).num_rows for i in range(groups.start))
    columns = [column] if label_column is None else [column, label_column]
    for batch in pf.iter_batches(batch_size=1024, row_groups=list(groups), columns=columns):
        texts = batch.column(0).to_pylist()
        labels = batch.column(1).to_pylist() if label_column is not None else [None] * len(texts)
        for value, label in zip(texts, labels):
            row += 1
            where = f"{piece.path}:row {row}"
            if isinstance(value, str) and len(value) > limit:
                yield TooLong(where)
            else:
                yield Record(value if isinstance(value, str) else None, where, label)
