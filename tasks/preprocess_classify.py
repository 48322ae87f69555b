"""Preprocessing for the classify task: a labelled corpus -> tokenizer -> labelled Arrow shards.

The same shape as the language-model path (tasks/preprocess.py): a content-addressed output
directory whose verified manifest is a cache hit, two Dask passes over bounded partitions,
atomic shards, the manifest last. The differences: one padded row of `max_len` tokens per
document with its true length and label id (tasks/shards.py), a stratified train/val split,
and a manifest that records the label set and the documents per label and split. Labels that
are missing, unknown or malformed are counted, shown and recorded, never mapped to a class.

    from tasks.preprocess_classify import preprocess_labelled
    manifest = preprocess_labelled(corpus, cfg.tokenizer, cfg.data, cfg.classify, Path(".tokenmill/shards"))
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from data_catalog.loader import Corpus
from tasks import incremental, manifest as mf, tokenizer as tok
from tasks.atomic import sha256_file, write_json
from tasks.cluster import dask_client, local_workers, planned_workers
from tasks.documents import FIXES, DocRules, LabelRules, Tally
from tasks.labelled import (SPLIT_RULE, LabelledEncodeSpec, LabelledSource, ScanResult, Selection,
                            encode_labelled_partition, scan_partition, select_documents)
from tasks.partitions import Partition, plan_partitions
from tokenmill.config import ClassifyConfig, DataConfig, TokenizerConfig
from tokenmill.console import console, step
from tokenmill.errors import TokenmillError
from tokenmill.locks import exclusive

LABEL_REASONS = ("dropped_missing_label", "dropped_unknown_label", "dropped_bad_label", "dropped_label_conflict")


def labelled_output(corpus: Corpus, tokenizer: TokenizerConfig, data: DataConfig, classify: ClassifyConfig,
                    shards_root: Path, reuse_tokenizer: Path | None) -> tuple[TokenizerConfig, Path | None, Path]:
    """The tokenizer settings in force, the tokenizer file to reuse (if any) and the output dir,
    named by everything that decides the shards' content (not by training-only settings)."""
    if reuse_tokenizer is not None:
        tokenizer = tokenizer.model_copy(update={"reuse": str(reuse_tokenizer)})
    reused = tok.resolve_reuse(tokenizer.reuse, Path(shards_root)) if tokenizer.reuse else None
    reuse_sha = sha256_file(reused) if reused else None
    settings = tokenizer.model_dump(exclude={"reuse"}) if reuse_sha else tokenizer.model_dump()
    key = mf.content_key(mf.FORMAT, "classify", SPLIT_RULE, corpus.fingerprint, settings,
                         data.model_dump(exclude={"context_len"}), classify.max_len, reuse_sha)
    return tokenizer, reused, Path(shards_root) / f"{corpus.name}-cls-{key[:16]}"


def labelled_source(corpus: Corpus, data: DataConfig) -> LabelledSource:
    e = corpus.entry
    rules = DocRules(e.format, e.text_field, data.normalize, data.min_chars, data.max_chars, data.on_decode_error,
                     data.on_bad_record)
    labels = LabelRules(e.label_field, tuple(e.labels) if e.labels else None)
    file_labels = tuple((f.path, f.label) for f in corpus.files) if e.label_dirs else ()
    return LabelledSource(rules, labels, file_labels)


def preprocess_labelled(corpus: Corpus, tokenizer: TokenizerConfig, data: DataConfig, classify: ClassifyConfig,
                        shards_root: Path, dask_address: str | None = None, n_workers: int | None = None,
                        refresh: bool = False, reuse_tokenizer: Path | None = None) -> Path:
    """The path of a verified labelled-shards manifest for this corpus and config, building it
    if needed; `refresh` discards an earlier build."""
    if not corpus.entry.labelled:
        raise TokenmillError(f"corpus '{corpus.name}' has no labels; set label_field or label_dirs in its catalog "
                             "entry, or preprocess it for the language model with --task lm")
    tokenizer, reused, out = labelled_output(corpus, tokenizer, data, classify, shards_root, reuse_tokenizer)
    with exclusive(out, f"building {out}"):  # an overlapping run waits here, then reuses this build
        if (cached := mf.reuse_or_clear(out, refresh)) is not None:
            step(f"labelled shards cached: {out} (verified)")
            return cached
        return build_labelled(corpus, tokenizer, data, classify, out, reused, dask_address, n_workers, refresh)


def build_labelled(corpus: Corpus, tokenizer: TokenizerConfig, data: DataConfig, classify: ClassifyConfig, out: Path,
                   reused: Path | None, dask_address: str | None, n_workers: int | None, refresh: bool) -> Path:
    """Tokenizer, labelled shards and, last, the manifest in `out`; returns the manifest's path."""
    if refresh:
        data = data.model_copy(update={"incremental": False})
    manifest_path = out / mf.MANIFEST
    started = time.time()
    source = labelled_source(corpus, data)
    parts = plan_partitions(corpus.files, source.rules.format, data.partition_bytes)
    with dask_client(dask_address, n_workers=local_workers(n_workers, len(parts))) as client:
        scans = scan_pass(client, parts, source)
        selection = select(corpus, scans, data.val_fraction)
        from tasks.preprocess import obtain_tokenizer  # the language-model path's: same tokenizer, same reuse

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


def remove_stale_temp_files(out: Path, before: float) -> None:
    """Temp files a killed run left behind (hidden `.name.xxx.tmp`); never a file of a live writer."""
    for tmp in out.glob(".*.tmp"):
        try:
            if tmp.stat().st_mtime < before:
                tmp.unlink()
        except FileNotFoundError:
            pass


def scan_pass(client, parts: list[Partition], source: LabelledSource) -> list[ScanResult]:
    step(f"label pass: reading {len(parts)} partitions on {planned_workers(client)} Dask workers")
    futures = [client.submit(scan_partition, p, _for_partition(source, p), priority=p.nbytes, pure=False) for p in parts]
    return sorted(client.gather(futures), key=lambda s: s.index)


def _for_partition(source: LabelledSource, part: Partition) -> LabelledSource:
    """The source with only this partition's file labels, so a task ships no more than it needs."""
    paths = set(part.paths)
    return LabelledSource(source.rules, source.labels, tuple(fl for fl in source.file_labels if fl[0] in paths))


def select(corpus: Corpus, scans: list[ScanResult], val_fraction: float) -> Selection:
    """Check that every file has labels and at least two classes remain; dedup, split, report."""
    tally = Tally()
    for s in scans:
        tally.update(s.tally)
    require_labels_in_files(corpus, scans)
    if not sum(len(s.hashes) for s in scans):
        why = "; ".join(f"{r}: {t}" for r, t in tally.problems().items()) or "every file is empty"
        raise TokenmillError(f"corpus '{corpus.name}' has no usable labelled documents in {len(corpus.files)} files ({why})")
    selection = select_documents(scans, corpus.entry.labels, val_fraction)
    tally.update(selection.tally)
    selection.tally = tally
    present = [n for n, k in selection.counts("train").items() if k + selection.counts("val")[n]]
    if len(present) < 2:
        only = f"only one label '{present[0]}'" if present else "no labels"
        raise TokenmillError(f"corpus '{corpus.name}' has {only} after filtering; a classifier needs at least two: "
                             "check the entry's labels and label_field, or add documents of other classes")
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
            raise TokenmillError(f"labels absent from {path}: no record has field '{corpus.entry.label_field}'; "
                                 "set the entry's label_field to the field that holds the label")


def report_labels(corpus: Corpus, selection: Selection, present: list[str]) -> None:
    """Label problems and empty declared classes, as status lines: never dropped silently."""
    counts, first = selection.tally.counts, selection.tally.first
    for reason in LABEL_REASONS:
        if counts[reason]:
            step(f"[yellow]{reason}[/]: {counts[reason]} documents (first: {first.get(reason, '?')}); {FIXES[reason]}")
    empty = [n for n in selection.names if n not in present]
    if empty:
        step(f"[yellow]labels without documents[/]: {', '.join(empty)} (declared in the catalog entry of {corpus.name})")


def encode_pass(client, parts: list[Partition], selection: Selection, spec: LabelledEncodeSpec) -> list[dict]:
    step(f"encoding {len(parts)} partitions, one row of up to {spec.max_len} tokens per document")
    futures = [client.submit(encode_labelled_partition, p, ids, val, replace(spec, source=_for_partition(spec.source, p)),
                             priority=p.nbytes, pure=False)
               for p, ids, val in zip(parts, selection.label_ids, selection.val)]
    return sorted(client.gather(futures), key=lambda r: r["index"])


def assemble_manifest(corpus, tokenizer, data, classify, spec, parts, selection, results) -> dict:
    stats: Counter = Counter()
    for r in results:
        stats.update(r["stats"])
    shards = [s for r in results for s in r["shards"]]
    for split in ("train", "val"):
        if not any(s["split"] == split for s in shards):
            raise TokenmillError(f"corpus '{corpus.name}' left no {split} documents; every class needs at least two "
                                 "documents (add data or check the labels)")
    stats.update(selection.tally.counts)
    stats["docs_out"] = stats["docs_train"] + stats["docs_val"]
    stats["duplicates"] = stats["dropped_duplicate"]
    stats["bytes_per_token"] = round(stats["bytes_out"] / max(1, stats["tokens"] + stats["tokens_truncated"]), 4)
    stats["partitions"] = len(parts)
    stats["labels"] = len(selection.names)
    sp = tok.load(Path(spec.tokenizer_path).read_bytes())
    record = json.loads((Path(spec.out_dir) / incremental.TOKENIZER_RECORD).read_text())
    return {
        "format": mf.FORMAT,
        "task": "classify",
        "corpus": {"name": corpus.name, "fingerprint": corpus.fingerprint, "files": len(corpus.files), "bytes": corpus.total_bytes},
        "tokenizer": {"path": "tokenizer.model", "sha256": spec.tokenizer_sha256, "vocab_size": sp.get_piece_size(),
                      "eos_id": sp.eos_id(), "origin": record["origin"]},
        "row_len": spec.max_len,
        "dtype": str(tok.token_dtype(sp.get_piece_size())),
        "labels": selection.names,
        "label_counts": {split: selection.counts(split) for split in ("train", "val")},
        "shards": shards,
        "partitions": [{"index": p.index, "pieces": len(p.pieces), "bytes": p.nbytes} for p in parts],
        "config": {"tokenizer": tokenizer.model_dump(), "data": data.model_dump(), "classify": classify.model_dump(),
                   "entry": corpus.entry.model_dump()},
        "stats": {k: v for k, v in stats.items() if v or not k.startswith("dropped_")},
        "problems": selection.tally.problems(),
    }


def summarize(manifest: dict) -> None:
    """A few lines: documents in and out, the classes with their train/val counts, truncation."""
    s = manifest["stats"]
    say = lambda line: console.print(line, soft_wrap=True, highlight=False)  # noqa: E731
    say(f"[bold green]preprocessed[/] {manifest['corpus']['name']} for classification: {s.get('docs_in', 0)} documents in, "
        f"{s.get('docs_out', 0)} out ({s.get('docs_train', 0)} train, {s.get('docs_val', 0)} val), "
        f"{s.get('duplicates', 0)} duplicates")
    train, val = manifest["label_counts"]["train"], manifest["label_counts"]["val"]
    say(f"  labels     {len(manifest['labels'])}: " + ", ".join(f"{n} {train[n]}/{val[n]}" for n in manifest["labels"]))
    say(f"  tokens     {s.get('tokens', 0):,} in rows of {manifest['row_len']}; {s.get('docs_truncated', 0)} documents "
        f"truncated ({s.get('tokens_truncated', 0):,} tokens cut)")
    for reason, text in manifest.get("problems", {}).items():
        say(f"  [yellow]{reason}[/] {text}")
