"""Turn a piece of a corpus file into clean documents: decode, parse, normalize, filter, hash.

Pure functions of (file bytes, settings); the Dask workers call them, and so do the tests.
Everything dropped is counted by reason in a `Tally`, with the first place it happened, so
a bad corpus is explained instead of silently shrinking. With `on_bad_record="fail"` a
malformed JSON line or a record without the text field stops the run, naming file and line.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from tasks.sources import FileProblem, Piece, Record, TooLong, file_format, read_records
from tokenmill.errors import TokenmillError

BYTES_PER_CHAR = 4  # UTF-8's worst case: a document of max_chars never needs more bytes

# Reasons a file or document is dropped, as counted in the stats, and what a user can do.
FIXES = {
    "files_empty": "nothing to do",
    "files_skipped_binary": "exclude the files from the entry's paths",
    "files_unreadable": "check the file or its compression",
    "files_missing_column": "set the entry's text_field to the Parquet column that holds the text",
    "dropped_bad_json": "fix the line or set data.on_bad_record=skip",
    "dropped_missing_field": "set the entry's text_field to the field that holds the text",
    "dropped_undecodable": "fix the encoding or set data.on_decode_error=replace",
    "dropped_too_long": "raise data.max_chars",
    "dropped_too_short": "lower data.min_chars",
    "docs_with_replaced_bytes": "kept with U+FFFD; set data.on_decode_error=drop to drop them",
}


@dataclass(frozen=True)
class DocRules:
    format: str = "text"  # text, lines, paragraphs, jsonl, parquet, or auto (by file extension)
    text_field: str = "text"
    normalize: str = "NFC"
    min_chars: int = 1
    max_chars: int = 2_000_000
    on_decode_error: str = "replace"  # or "drop"
    on_bad_record: str = "skip"  # or "fail"

    @property
    def max_bytes(self) -> int:
        return self.max_chars * BYTES_PER_CHAR + 2


@dataclass
class Tally:
    """Counts by reason, and where each reason was first seen (for messages)."""

    counts: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def note(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.first.setdefault(reason, where)

    def update(self, other: Tally) -> None:
        self.counts.update(other.counts)
        for reason, where in other.first.items():
            self.first.setdefault(reason, where)

    def problems(self) -> dict[str, str]:
        """Each drop reason seen, with its count, first place and fix, for the manifest and messages."""
        return {
            r: f"{self.counts[r]} (first: {self.first[r]}); {FIXES.get(r, '')}".rstrip("; ")
            for r in sorted(self.first)
            if r in FIXES
        }


def read_documents(piece: Piece | str, rules: DocRules, tally: Tally) -> Iterator[str]:
    """Normalized documents of a piece that pass the filters; what is dropped is counted."""
    piece = Piece(piece) if isinstance(piece, str) else piece
    fmt = file_format(piece.path, rules.format)
    if piece.start == 0:
        tally.counts["files"] += 1
    for item in read_records(piece, fmt, rules.max_bytes, rules.text_field):
        if isinstance(item, FileProblem):
            _file_problem(item, rules, tally)
            continue
        if fmt == "jsonl" and isinstance(item, Record) and not item.data.strip():
            continue  # a blank line between records is not a record
        tally.counts["docs_in"] += 1
        if isinstance(item, TooLong):
            tally.note("dropped_too_long", item.where)
            continue
        tally.counts["bytes_in"] += len(item.data) if isinstance(item.data, bytes) else 0
        doc = _text(item, fmt, rules, tally)
        if doc is None:
            continue
        if rules.normalize != "none":
            doc = unicodedata.normalize(rules.normalize, doc)
        if len(doc) < max(rules.min_chars, 1):
            tally.note("dropped_too_short", item.where)
        elif len(doc) > rules.max_chars:
            tally.note("dropped_too_long", item.where)
        else:
            yield doc


def _file_problem(item: FileProblem, rules: DocRules, tally: Tally) -> None:
    reason = {"binary": "files_skipped_binary", "missing_column": "files_missing_column"}.get(item.reason)
    reason = reason or f"files_{item.reason}"
    if reason == "files_missing_column" and rules.on_bad_record == "fail":
        raise TokenmillError(f"{item.where}; {FIXES[reason]}")
    tally.note(reason, item.where)


def _text(item: Record, fmt: str, rules: DocRules, tally: Tally) -> str | None:
    """The record's text: decoded per `on_decode_error`, and for JSON Lines parsed; None if dropped."""
    data = item.data
    if data is None or isinstance(data, str):
        if data is None:
            _bad_record("dropped_missing_field", item.where, rules, tally, f"no string field '{rules.text_field}'")
        return data
    text = _decode(data, item.where, rules, tally)
    if text is None or fmt != "jsonl":
        return text
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        _bad_record("dropped_bad_json", item.where, rules, tally, f"malformed JSON ({exc.msg} at column {exc.colno})")
        return None
    value = record.get(rules.text_field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        _bad_record("dropped_missing_field", item.where, rules, tally, f"no string field '{rules.text_field}'")
        return None
    return value


def _decode(data: bytes, where: str, rules: DocRules, tally: Tally) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if rules.on_decode_error == "drop":
            tally.note("dropped_undecodable", f"{where} (byte {exc.start})")
            return None
        tally.note("docs_with_replaced_bytes", f"{where} (byte {exc.start})")
        return data.decode("utf-8", errors="replace")


def _bad_record(reason: str, where: str, rules: DocRules, tally: Tally, what: str) -> None:
    if rules.on_bad_record == "fail":
        raise TokenmillError(f"{exact_line(where)}: {what}; {FIXES[reason]}")
    tally.note(reason, where)


def exact_line(where: str) -> str:
    """`file@byte` as `file:line`, by counting newlines before the byte (only on the error path)."""
    path, sep, offset = where.rpartition("@")
    if not sep or not offset.isdigit():
        return where
    from tasks.sources import open_stream

    remaining, lines = int(offset), 1
    with open_stream(path) as f:
        while remaining > 0 and (block := f.read(min(remaining, 1 << 20))):
            lines += block.count(b"\n")
            remaining -= len(block)
    return f"{path}:{lines}"


def doc_hash(doc: str) -> int:
    """A 64-bit hash of the normalized text: the dedup key and the split key."""
    return int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "little")


def is_val(h: int, val_fraction: float) -> bool:
    # The low bits pick the split, so identical documents always land in the same split.
    return (h % 1_000_000) < round(val_fraction * 1_000_000)
