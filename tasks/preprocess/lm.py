"""Language-model shards: a corpus -> packed token rows of `context_len + 1`, screened and deduplicated.

One pass over bounded partitions filters (data.quality), hashes, signs (MinHash, for
data.near_dup), encodes and writes each partition's shards, dropping only documents repeated
within the partition. Dedup across the corpus is settled afterwards on the client from the
cached hashes and signatures: exact repeats (the first occurrence wins), then near-duplicates
(the first of each cluster wins). A partition that drops more than it guessed is repacked
without those documents, from its own shards, without encoding anything again. Partitions
whose input is unchanged are reused from this directory or an earlier build of the corpus
(see incremental.py). A sample of what was dropped goes to `dropped/`; the manifest is last.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from data_catalog.loader import Corpus
from tasks.core import manifest as mf
from tasks.core.atomic import write_json
from tasks.preprocess import dropped, encode, incremental
from tasks.preprocess.base import (
    EmptySample,
    Stopwatch,
    corpus_record,
    doc_rules,
    obtain_tokenizer,
    remove_stale_temp_files,
    tokenizer_record,
)
from tasks.preprocess.cluster import client_in_background, local_workers, planned_workers
from tasks.preprocess.documents import DocRules, Tally
from tasks.preprocess.partitions import Partition, plan_partitions
from tasks.preprocess.report import encode_progress, summarize
from tasks.preprocess.screen import Screen, screen_of
from tokenmill.config import DataConfig, TokenizerConfig
from tokenmill.console import step
from tokenmill.errors import TokenmillError


def build_shards(
    corpus: Corpus,
    tokenizer: TokenizerConfig,
    data: DataConfig,
    out: Path,
    reused: Path | None,
    dask_address: str | None,
    n_workers: int | None,
) -> Path:
    """Tokenizer, shards and, last, the manifest in `out`; returns the manifest's path."""
    manifest_path = out / mf.MANIFEST
    started = time.time()
    rules = doc_rules(corpus, data)
    parts = plan_partitions(corpus.files, rules.format, data.partition_bytes)
    dirs = incremental.build_dirs(out, corpus.name) if data.incremental else [out]
    workers = local_workers(n_workers, len(parts))
    clock = Stopwatch()
    screen = screen_of(data)
    with client_in_background(dask_address, n_workers=workers) as connect:
        known = cached_hashes(parts, rules, dirs, screen)
        tok_path, tok_sha = tokenizer_or_reason(
            connect, corpus, rules, tokenizer, data.seed, dirs, reused, parts, screen
        )
        clock.lap("seconds_tokenizer")
        spec = encode.EncodeSpec(
            rules, str(tok_path), tok_sha, data.context_len + 1, data.val_fraction, str(out), screen
        )
        todo = [p for p in parts if p.index not in known]
        if todo:
            connect()
            clock.lap("seconds_cluster_wait")
        guessed = first_pass(connect, todo, spec, len(parts))
        clock.lap("seconds_first_pass")
        hashes = [known[p.index] if p.index in known else guessed[p.index].hash_result() for p in parts]
        require_documents(corpus, hashes)
        decision = dropped.decide([h.hashes for h in hashes], signature_loader(parts, spec), screen)
        clock.lap("seconds_near_dup")
        results = settle_pass(connect, parts, decision, guessed, spec, dirs)
        clock.lap("seconds_settle_pass")
        picks = dropped.pick_repeats([h.hashes for h in hashes], decision, data.seed, data.drop_sample)
        repeats = dropped.repeat_samples(connect, parts, picks, rules, screen)
        clock.lap("seconds_drop_samples")
    manifest = assemble_manifest(corpus, tokenizer, data, spec, parts, results, time.time() - started)
    manifest["stats"].update(clock.laps)
    samples = [r.samples for r in results] + [{e["reason"]: [e]} for e in repeats]
    manifest["dropped"] = dropped.record(out, manifest["stats"], samples, data.drop_sample)
    write_json(manifest_path, manifest)
    shutil.rmtree(out / encode.SPANS, ignore_errors=True)  # only a repack in this run needed them
    remove_stale_temp_files(out, started)
    summarize(manifest)
    return manifest_path


def cached_hashes(
    parts: list[Partition], rules: DocRules, dirs: list[Path], screen: Screen | None = None
) -> dict[int, encode.HashResult]:
    """The document hashes of every partition whose input an earlier run already read."""
    known = {}
    for part in parts:
        cached = incremental.find_hashes(dirs, encode.input_key(part, rules, screen))
        if cached is not None:
            known[part.index] = encode.load_hashes(part.index, cached)
    return known


def hash_pass(
    client, parts: list[Partition], rules: DocRules, dirs: list[Path], screen: Screen | None = None
) -> list[encode.HashResult]:
    """Every partition's document hashes: from a cache where the partition's input is unchanged."""
    done = cached_hashes(parts, rules, dirs, screen)
    todo = [
        (p, str(dirs[0] / encode.HASHES / f"{encode.input_key(p, rules, screen)}.npz"))
        for p in parts
        if p.index not in done
    ]
    if todo:
        futures = largest_first(client, encode.hash_partition, [(p, rules, dest, screen) for p, dest in todo])
        for r in client.gather(futures):
            done[r.index] = r
    return [done[p.index] for p in parts]


def require_documents(corpus: Corpus, hashes: list[encode.HashResult]) -> None:
    """Stop with the reasons when nothing in the corpus survives reading and filtering."""
    if sum(len(h.hashes) for h in hashes):
        return
    tally = Tally()
    for h in hashes:
        tally.update(h.tally)
    why = "; ".join(f"{reason}: {text}" for reason, text in tally.problems().items())
    filtered = {r: n["docs"] for r, n in dropped.counts(tally.counts).items()}
    if filtered:
        why = "; ".join([*filter(None, [why]), f"dropped by data.quality filters: {filtered}; loosen them"])
    why = why or "every file is empty"
    raise TokenmillError(f"corpus '{corpus.name}' has no usable documents in {len(corpus.files)} files ({why})")


def tokenizer_or_reason(
    connect,
    corpus: Corpus,
    rules: DocRules,
    cfg: TokenizerConfig,
    seed: int,
    dirs: list[Path],
    reused: Path | None,
    parts: list[Partition],
    screen: Screen,
) -> tuple[Path, str]:
    """`obtain_tokenizer`; when there was nothing to train it on, why each file gave no document."""
    try:
        return obtain_tokenizer(corpus, rules, cfg, seed, dirs, reused)
    except EmptySample:
        require_documents(corpus, hash_pass(connect(), parts, rules, dirs, screen))
        raise


def first_pass(
    connect, todo: list[Partition], spec: encode.EncodeSpec, n_parts: int
) -> dict[int, encode.PartitionResult]:
    """Hash, encode and write the partitions whose hashes are not cached yet, each guessing that it
    repeats no document of an earlier partition; each is read once, and its hashes cached."""
    if not todo:
        return {}
    client = connect()
    mb = sum(p.nbytes for p in todo) / 1e6
    step(f"encoding {len(todo)} of {n_parts} partitions ({mb:.1f} MB) on {planned_workers(client)} Dask workers")
    hashes_dir = Path(spec.out_dir) / encode.HASHES
    calls = [(p, None, spec, "", str(hashes_dir / f"{encode.input_key(p, spec.rules, spec.screen)}.npz")) for p in todo]
    futures = largest_first(client, encode.encode_partition, calls)
    return {r.index: r for r in encode_progress(futures, {p.index: p.nbytes for p in todo})}


def signature_loader(parts: list[Partition], spec: encode.EncodeSpec):
    """Partition p's MinHash signatures, from its hash cache in the output dir (the first pass
    wrote it there, or a reused one was linked there)."""
    folder = Path(spec.out_dir) / encode.HASHES
    return lambda p: encode.load_signatures(folder / f"{encode.input_key(parts[p], spec.rules, spec.screen)}.npz")


def settle_pass(
    connect,
    parts: list[Partition],
    decision: dropped.Decision,
    guessed: dict[int, encode.PartitionResult],
    spec: encode.EncodeSpec,
    dirs: list[Path],
) -> list[encode.PartitionResult]:
    """Every partition's shards with the corpus-wide dedup: a first-pass guess where it holds, else
    that guess repacked without the repeats, else a finished partition with the right encode
    key, else encoded."""
    results: list[encode.PartitionResult] = []
    repack, encode_again = [], []
    for part, drop, near in zip(parts, decision.drops, decision.near):
        key = encode.encode_key(encode.input_key(part, spec.rules, spec.screen), drop, spec, near)
        guess = guessed.get(part.index)
        if guess is not None and guess.key == key:
            results.append(guess)
        elif guess is not None:  # it repeats an earlier partition: no record may name shards about to change
            (dirs[0] / encode.PARTS / f"{guess.key}.json").unlink(missing_ok=True)
            repack.append((replace(guess, hashes=None), drop, spec, key, near))
        elif (found := incremental.find_partition(dirs, key, part.index)) is not None:
            results.append(found)
        else:
            encode_again.append((part, drop, spec, key, None, near))
    step(
        f"dedup across partitions: {len(repack)} partitions repacked, {len(encode_again)} encoded, "
        f"{sum(r.reused for r in results)} reused"
    )
    nbytes = {p.index: p.nbytes for p in parts}
    for fn, calls, label in (
        (encode.drop_repeats, repack, "repacking"),
        (encode.encode_partition, encode_again, "encoding"),
    ):
        if calls:
            futures = largest_first(connect(), fn, calls, [nbytes[c[0].index] for c in calls])
            results += encode_progress(futures, nbytes, label)
    return sorted(results, key=lambda r: r.index)


def largest_first(client, fn, calls: list[tuple], sizes: list[int] | None = None) -> list:
    """Futures of fn(*call), the largest partitions (`sizes`, or the calls' first argument's
    nbytes) scheduled first, so no big one is left for the end."""
    sizes = sizes or [call[0].nbytes for call in calls]
    return [client.submit(fn, *call, priority=size, pure=False) for call, size in zip(calls, sizes)]


def assemble_manifest(corpus, tokenizer, data, spec, parts, results, seconds: float) -> dict:
    stats: Counter = Counter()
    tally = Tally()
    for r in results:
        stats.update(r.stats)
        tally.update(Tally(Counter(r.stats), r.first))
    shards = [s for r in results for s in r.shards]
    if not any(s["split"] == "val" for s in shards):
        raise TokenmillError(
            f"corpus '{corpus.name}' left no validation rows; raise data.val_fraction or lower data.context_len"
        )
    if not any(s["split"] == "train" for s in shards):
        raise TokenmillError(f"corpus '{corpus.name}' left no training rows; add data or lower data.context_len")
    tokenizer_entry, dtype = tokenizer_record(spec.tokenizer_path, spec.tokenizer_sha256, spec.out_dir)
    stats["docs_out"] = stats["docs_train"] + stats["docs_val"]
    stats["duplicates"] = stats["dropped_duplicate"]
    stats["near_duplicates"] = stats["dropped_near_duplicate"]
    stats["bytes_per_token"] = round(stats["bytes_out"] / max(1, stats["tokens"]), 4)
    for name in [k for k in stats if k.startswith("seconds_")]:  # encoding and screening partitions, summed
        stats[name] = round(stats[name], 2)
    stats["seconds"] = round(seconds, 2)
    stats["partitions"] = len(results)
    stats["partitions_reused"] = sum(r.reused for r in results)
    stats["partitions_repacked"] = sum(r.repacked for r in results)
    return {
        "format": mf.FORMAT,
        "corpus": corpus_record(corpus),
        "tokenizer": tokenizer_entry,
        "row_len": spec.row_len,
        "dtype": dtype,
        "shards": shards,
        "partitions": [
            {
                "index": p.index,
                "key": r.key,
                "pieces": len(p.pieces),
                "bytes": p.nbytes,
                "reused": r.reused,
                "repacked": r.repacked,
            }
            for p, r in zip(parts, results)
        ],
        "config": {"tokenizer": tokenizer.model_dump(), "data": data.model_dump(), "entry": corpus.entry.model_dump()},
        "stats": dict(stats),
        "problems": tally.problems(),
    }
