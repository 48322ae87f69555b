"""Turn a piece of a corpus file into clean documents: decode, parse, normalize, filter, hash.

Pure functions of (file bytes, settings); the Dask workers call them, and so do the tests.
Everything dropped is counted by reason in a `Tally`, with the first place it happened, so
a bad corpus is explained instead of silently shrinking. With `on_bad_record="fail"` a
malformed JSON line or a record without the text field stops the run, naming file and line.

Labelled corpora (`read_labelled`) give (document, label) pairs: the label comes from a JSON
field or Parquet column, or is the file's own (directory-per-class). A missing, unknown or
malformed label drops the document and is counted like any other reason; a file that has no
label at all, or a Parquet label column of the wrong type, is an error.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from tasks.preprocess.sources import FileProblem, Piece, Record, TooLong, file_format, read_records
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
    "dropped_missing_label": "give every record a label (null, empty and absent labels are missing)",
    "dropped_unknown_label": "add the label to the entry's labels, or fix the records",
    "dropped_bad_label": "labels must be strings or integers; fix the records or set data.on_bad_record=skip",
    "dropped_label_conflict": "the same text appears with different labels; the first one is kept",
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


@dataclass(frozen=True)
class LabelRules:
    """Where a document's label comes from, and which labels are kept."""

    field: str | None = None  # the JSON field or Parquet column; None: the file's own label
    labels: tuple[str, ...] | None = None  # the declared label set; None keeps every label


def read_documents(piece: Piece | str, rules: DocRules, tally: Tally) -> Iterator[str]:
    """Normalized documents of a piece that pass the filters; what is dropped is counted."""
    for doc, _, _ in _documents(piece, rules, tally):
        yield doc


def read_placed(piece: Piece | str, rules: DocRules, tally: Tally) -> Iterator[tuple[str, str]]:
    """(document, where it lies) of `read_documents`: "file:line", "file@byte" or "file:row N"."""
    for doc, _, where in _documents(piece, rules, tally):
        yield doc, where


def read_labelled(
    piece: Piece | str,
    rules: DocRules,
    labels: LabelRules,
    tally: Tally,
    file_label: str | None = None,
    seen: dict[str, list[int]] | None = None,
) -> Iterator[tuple[str, str]]:
    """(document, label) pairs of a piece; documents without a usable or known label are counted
    and dropped. `seen[path]` counts [records read, records with a label field] per file."""
    for doc, raw, where in _documents(piece, rules, tally, labels.field, seen):
        label = file_label if labels.field is None else label_name(raw, where, rules, tally)
        if label is None:
            if labels.field is None:
                tally.note("dropped_missing_label", where)
            continue
        if labels.labels is not None and label not in labels.labels:
            tally.note("dropped_unknown_label", f"{where} (label '{label}')")
            continue
        yield doc, label


def label_name(raw: object, where: str, rules: DocRules, tally: Tally) -> str | None:
    """A label value as its name: a string as is, an integer in decimal; None when it is missing
    (absent, null or empty) or not a string or integer (both counted)."""
    if raw is None or raw == "":
        tally.note("dropped_missing_label", where)
        return None
    if isinstance(raw, str):
        return raw
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    _bad_record("dropped_bad_label", where, rules, tally, f"label {json.dumps(raw)[:40]} is not a string or integer")
    return None


def _documents(
    piece: Piece | str,
    rules: DocRules,
    tally: Tally,
    label_field: str | None = None,
    seen: dict[str, list[int]] | None = None,
) -> Iterator[tuple[str, object, str]]:
    """(document, raw label, where) of a piece; the label is read only when `label_field` is set."""
    piece = Piece(piece) if isinstance(piece, str) else piece
    fmt = file_format(piece.path, rules.format)
    if piece.start == 0:
        tally.counts["files"] += 1
    label_column = label_field if fmt == "parquet" else None
    for item in read_records(piece, fmt, rules.max_bytes, rules.text_field, label_column):
        if isinstance(item, FileProblem):
            _file_problem(item, rules, tally, label_field)
            continue
        if fmt == "jsonl" and isinstance(item, Record) and not item.data.strip():
            continue  # a blank line between records is not a record
        tally.counts["docs_in"] += 1
        if isinstance(item, TooLong):
            tally.note("dropped_too_long", item.where)
            continue
        tally.counts["bytes_in"] += len(item.data) if isinstance(item.data, bytes) else 0
        doc, label = _text(item, fmt, rules, tally, label_field)
        if doc is None:
            continue
        if seen is not None and label_field is not None:
            counts = seen.setdefault(piece.path, [0, 0])
            counts[0] += 1
            counts[1] += label is not None and label != ""
        if rules.normalize != "none":
            doc = unicodedata.normalize(rules.normalize, doc)
        if len(doc) < max(rules.min_chars, 1):
            tally.note("dropped_too_short", item.where)
        elif len(doc) > rules.max_chars:
            tally.note("dropped_too_long", item.where)
        else:
            yield doc, label, item.where


def _file_problem(item: FileProblem, rules: DocRules, tally: Tally, label_field: str | None = None) -> None:
    if item.reason == "missing_label_column":
        path = item.where.split(" has no column", 1)[0]
        raise TokenmillError(
            f"labels absent from {path}: {item.where.removeprefix(path + ' has ')}; "
            f"set the entry's label_field to the column that holds the label"
        )
    if item.reason == "bad_label_type":
        raise TokenmillError(
            f"{item.where}, not string or integer; store the labels as strings or integers "
            f"or set the entry's label_field to the column that holds them"
        )
    reason = {"binary": "files_skipped_binary", "missing_column": "files_missing_column"}.get(item.reason)
    reason = reason or f"files_{item.reason}"
    if reason == "files_missing_column" and rules.on_bad_record == "fail":
        raise TokenmillError(f"{item.where}; {FIXES[reason]}")
    tally.note(reason, item.where)


def _text(item: Record, fmt: str, rules: DocRules, tally: Tally, label_field: str | None) -> tuple[str | None, object]:
    """The record's text (decoded per `on_decode_error`, for JSON Lines parsed; None if dropped)
    and its raw label (a Parquet row's, or the JSON record's `label_field`; None if it has none)."""
    data = item.data
    if data is None or isinstance(data, str):
        if data is None:
            _bad_record("dropped_missing_field", item.where, rules, tally, f"no string field '{rules.text_field}'")
        return data, item.label
    text = _decode(data, item.where, rules, tally)
    if text is None or fmt != "jsonl":
        return text, None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        _bad_record("dropped_bad_json", item.where, rules, tally, f"malformed JSON ({exc.msg} at column {exc.colno})")
        return None, None
    value = record.get(rules.text_field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        _bad_record("dropped_missing_field", item.where, rules, tally, f"no string field '{rules.text_field}'")
        return None, None
    return value, record.get(label_field) if label_field is not None else None


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
    from tasks.preprocess.sources import open_stream

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
