"""Labelled shards for the classify task: a labelled corpus -> one padded row per document.

The same shape as the language-model path (lm.py): two Dask passes over bounded partitions,
atomic shards, the manifest last. The differences: one padded row of `max_len` tokens per
document with its true length and label id (tasks/core/shards.py), a stratified train/val split,
and a manifest that records the label set and the documents per label and split. Labels that
are missing, unknown or malformed are counted, shown and recorded, never mapped to a class.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from data_catalog.loader import Corpus
from tasks.core import manifest as mf
from tasks.core.atomic import write_json
from tasks.preprocess import incremental
from tasks.preprocess.base import corpus_record, doc_rules, obtain_tokenizer, remove_stale_temp_files, tokenizer_record
from tasks.preprocess.cluster import dask_client, local_workers, planned_workers
from tasks.preprocess.documents import FIXES, LabelRules, Tally
from tasks.preprocess.labelled import (
    LabelledEncodeSpec,
    LabelledSource,
    ScanResult,
    Selection,
    encode_labelled_partition,
    scan_partition,
    select_documents,
)
from tasks.preprocess.partitions import Partition, plan_partitions
from tasks.preprocess.report import summarize
from tokenmill.config import ClassifyConfig, DataConfig, TokenizerConfig
from tokenmill.console import step
from tokenmill.errors import TokenmillError

LABEL_REASONS = ("dropped_missing_label", "dropped_unknown_label", "dropped_bad_label", "dropped_label_conflict")


def labelled_source(corpus: Corpus, data: DataConfig) -> LabelledSource:
    e = corpus.entry
    rules = doc_rules(corpus, data)
    labels = LabelRules(e.label_field, tuple(e.labels) if e.labels else None)
    file_labels = tuple((f.path, f.label) for f in corpus.files) if e.label_dirs else ()
    return LabelledSource(rules, labels, file_labels, data.quality if data.quality.active() else None)


def build_labelled(
    corpus: Corpus,
    tokenizer: TokenizerConfig,
    data: DataConfig,
    classify: ClassifyConfig,
    out: Path,
    reused: Path | None,
    dask_address: str | None,
    n_workers: int | None,
) -> Path:
    """Tokenizer, labelled shards and, last, the manifest in `out`; returns the manifest's path."""
    manifest_path = out / mf.MANIFEST
    started = time.time()
    source = labelled_source(corpus, data)
    parts = plan_partitions(corpus.files, source.rules.format, data.partition_bytes)
    with dask_client(dask_address, n_workers=local_workers(n_workers, len(parts))) as client:
        scans = scan_pass(client, parts, source)
        selection = select(corpus, scans, data.val_fraction)
        dirs = incremental.build_dirs(out, corpus.name) if data.incremental else [out]
        tok_path, tok_sha = obtain_tokenizer(corpus, source.rules, tokenizer, data.seed, dirs, reused)
        spec = LabelledEncodeSpec(source, str(tok_path), tok_sha, classify.max_len, str(out))
        results = encode_pass(client, parts, selection, spec)
    manifest = assemble_manifest(corpus, tokenizer, data, classify, spec, parts, selection, results)
    manifest["stats"]["seconds"] = round(time.time() - started, 2)
    write_json(manifest_path, manifest)
    remove_stale_temp_files(out, started)
    summarize(manifest)
    return manifest_path


def scan_pass(client, parts: list[Partition], source: LabelledSource) -> list[ScanResult]:
    step(f"label pass: reading {len(parts)} partitions on {planned_workers(client)} Dask workers")
    futures = [
        client.submit(scan_partition, p, _for_partition(source, p), priority=p.nbytes, pure=False) for p in parts
    ]
    return sorted(client.gather(futures), key=lambda s: s.index)


def _for_partition(source: LabelledSource, part: Partition) -> LabelledSource:
    """The source with only this partition's file labels, so a task ships no more than it needs."""
    paths = set(part.paths)
    file_labels = tuple(fl for fl in source.file_labels if fl[0] in paths)
    return LabelledSource(source.rules, source.labels, file_labels, source.quality)


def select(corpus: Corpus, scans: list[ScanResult], val_fraction: float) -> Selection:
    """Check that every file has labels and at least two classes remain; dedup, split, report."""
    tally = Tally()
    for s in scans:
        tally.update(s.tally)
    require_labels_in_files(corpus, scans)
    if not sum(len(s.hashes) for s in scans):
        why = "; ".join(f"{r}: {t}" for r, t in tally.problems().items()) or "every file is empty"
        raise TokenmillError(
            f"corpus '{corpus.name}' has no usable labelled documents in {len(corpus.files)} files ({why})"
        )
    selection = select_documents(scans, corpus.entry.labels, val_fraction)
    tally.update(selection.tally)
    selection.tally = tally
    present = [n for n, k in selection.counts("train").items() if k + selection.counts("val")[n]]
    if len(present) < 2:
        only = f"only one label '{present[0]}'" if present else "no labels"
        raise TokenmillError(
            f"corpus '{corpus.name}' has {only} after filtering; a classifier needs at least two: "
            "check the entry's labels and label_field, or add documents of other classes"
        )
    report_labels(corpus, selection, present)
    return selection


def require_labels_in_files(corpus: Corpus, scans: list[ScanResult]) -> None:
    """A file whose records all lack the label field is a wrong label_field, not missing labels."""
    seen: dict[str, list[int]] = {}
    for s in scans:
        for path, (records, labelled) in s.seen.items():
            total = seen.setdefault(path, [0, 0])
            total[0] += records
            total[1] += labelled
    for path, (records, labelled) in sorted(seen.items()):
        if records and not labelled:
            raise TokenmillError(
                f"labels absent from {path}: no record has field '{corpus.entry.label_field}'; "
                "set the entry's label_field to the field that holds the label"
            )


def report_labels(corpus: Corpus, selection: Selection, present: list[str]) -> None:
    """Label problems and empty declared classes, as status lines: never dropped silently."""
    counts, first = selection.tally.counts, selection.tally.first
    for reason in LABEL_REASONS:
        if counts[reason]:
            step(f"[yellow]{reason}[/]: {counts[reason]} documents (first: {first.get(reason, '?')}); {FIXES[reason]}")
    empty = [n for n in selection.names if n not in present]
    if empty:
        step(
            f"[yellow]labels without documents[/]: {', '.join(empty)} (declared in the catalog entry of {corpus.name})"
        )


def encode_pass(client, parts: list[Partition], selection: Selection, spec: LabelledEncodeSpec) -> list[dict]:
    step(f"encoding {len(parts)} partitions, one row of up to {spec.max_len} tokens per document")
    futures = [
        client.submit(
            encode_labelled_partition,
            p,
            ids,
            val,
            replace(spec, source=_for_partition(spec.source, p)),
            priority=p.nbytes,
            pure=False,
        )
        for p, ids, val in zip(parts, selection.label_ids, selection.val)
    ]
    return sorted(client.gather(futures), key=lambda r: r["index"])


def assemble_manifest(corpus, tokenizer, data, classify, spec, parts, selection, results) -> dict:
    stats: Counter = Counter()
    for r in results:
        stats.update(r["stats"])
    shards = [s for r in results for s in r["shards"]]
    for split in ("train", "val"):
        if not any(s["split"] == split for s in shards):
            raise TokenmillError(
                f"corpus '{corpus.name}' left no {split} documents; every class needs at least two "
                "documents (add data or check the labels)"
            )
    stats.update(selection.tally.counts)
    stats["docs_out"] = stats["docs_train"] + stats["docs_val"]
    stats["duplicates"] = stats["dropped_duplicate"]
    stats["bytes_per_token"] = round(stats["bytes_out"] / max(1, stats["tokens"] + stats["tokens_truncated"]), 4)
    stats["partitions"] = len(parts)
    stats["labels"] = len(selection.names)
    tokenizer_entry, dtype = tokenizer_record(spec.tokenizer_path, spec.tokenizer_sha256, spec.out_dir)
    return {
        "format": mf.FORMAT,
        "task": "classify",
        "corpus": corpus_record(corpus),
        "tokenizer": tokenizer_entry,
        "row_len": spec.max_len,
        "dtype": dtype,
        "labels": selection.names,
        "label_counts": {split: selection.counts(split) for split in ("train", "val")},
        "shards": shards,
        "partitions": [{"index": p.index, "pieces": len(p.pieces), "bytes": p.nbytes} for p in parts],
        "config": {
            "tokenizer": tokenizer.model_dump(),
            "data": data.model_dump(),
            "classify": classify.model_dump(),
            "entry": corpus.entry.model_dump(),
        },
        "stats": {k: v for k, v in stats.items() if v or not k.startswith("dropped_")},
        "problems": selection.tally.problems(),
    }
