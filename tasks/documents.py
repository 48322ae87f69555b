"""Read documents out of corpus files, normalize them, filter them and hash them.

Pure functions of (file bytes, settings); the Dask workers call them, and so do the tests.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BINARY_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class DocRules:
    format: str = "text"
    text_field: str = "text"
    normalize: str = "NFC"
    min_chars: int = 1
    max_chars: int = 2_000_000


def open_bytes(path: str) -> bytes:
    """A file's bytes, decompressed by extension (.gz, .bz2, .zst)."""
    if path.endswith(".gz"):
        return gzip.decompress(Path(path).read_bytes())
    if path.endswith(".bz2"):
        return bz2.decompress(Path(path).read_bytes())
    if path.endswith(".zst"):
        import zstandard

        with open(path, "rb") as f:
            return zstandard.ZstdDecompressor().stream_reader(f).read()
    return Path(path).read_bytes()


def is_binary(data: bytes) -> bool:
    return b"\0" in data[:BINARY_SNIFF_BYTES]


def split_documents(text: str, rules: DocRules) -> Iterator[str]:
    """The raw documents of one file's text, per the entry's format."""
    if rules.format in ("lines", "paragraphs"):
        text = text.replace("\r\n", "\n")
    if rules.format == "text":
        yield text
    elif rules.format == "lines":
        yield from (line for line in text.split("\n"))
    elif rules.format == "paragraphs":
        yield from (p.strip("\n") for p in text.split("\n\n"))
    elif rules.format == "jsonl":
        for line in io.StringIO(text):
            if line.strip():
                record = json.loads(line)
                value = record.get(rules.text_field) if isinstance(record, dict) else None
                yield value if isinstance(value, str) else ""
    else:
        raise ValueError(f"unknown format {rules.format!r}")


def read_documents(path: str, rules: DocRules, stats: Counter) -> Iterator[str]:
    """Normalized documents that pass the filters; what is dropped is counted in `stats`."""
    data = open_bytes(path)
    stats["files"] += 1
    stats["bytes_in"] += len(data)
    if is_binary(data):
        stats["files_skipped_binary"] += 1
        return
    text = data.decode("utf-8", errors="replace")
    if "\ufffd" in text and b"\xef\xbf\xbd" not in data:
        stats["files_with_undecodable_bytes"] += 1
    try:
        docs = list(split_documents(text, rules))
    except json.JSONDecodeError:
        stats["files_skipped_bad_json"] += 1
        return
    for doc in docs:
        stats["docs_in"] += 1
        if rules.normalize != "none":
            doc = unicodedata.normalize(rules.normalize, doc)
        if len(doc) < max(rules.min_chars, 1):
            stats["dropped_too_short"] += 1
            continue
        if len(doc) > rules.max_chars:
            stats["dropped_too_long"] += 1
            continue
        yield doc


def doc_hash(doc: str) -> int:
    """A 64-bit hash of the normalized text: the dedup key and the split key."""
    return int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "little")


def is_val(h: int, val_fraction: float) -> bool:
    # The low bits pick the split, so identical documents always land in the same split.
    return (h % 1_000_000) < round(val_fraction * 1_000_000)
