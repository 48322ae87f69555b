"""Preprocessing stage: corpus files -> SentencePiece tokenizer -> Arrow shards + manifest.

The output directory is named by a hash of everything that determines its content (corpus
fingerprint, tokenizer and data settings), so a verified manifest there is a cache hit and
preprocessing is skipped. The Dask cluster starts while the tokenizer is trained (or found).
Then one pass over bounded partitions hashes, encodes and writes each partition's shards,
dropping only documents repeated within the partition. Exact dedup across the corpus (the
first occurrence wins) is settled afterwards from the hashes: a partition that repeats a
document of an earlier one is repacked without it, from its own shards, without encoding
anything again. Partitions whose input is unchanged are reused from this directory or an
earlier build of the corpus (see tasks/incremental.py). The manifest is written last.

    from tasks.preprocess import preprocess_corpus
    manifest = preprocess_corpus.fn(corpus, cfg.tokenizer, cfg.data, Path(".tokenmill/shards"))
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from prefect import task

from data_catalog.loader import Corpus
from tasks import encode, incremental, manifest as mf, tokenizer as tok
from tasks.atomic import sha256_file, write_bytes, write_json
from tasks.cluster import client_in_background, local_workers, planned_workers
from tasks.documents import DocRules, Tally
from tasks.partitions import Partition, plan_partitions
from tasks.policy import retry_transient
from tasks.preprocess_report import encode_progress, summarize
from tokenmill.config import ClassifyConfig, DataConfig, TokenizerConfig
from tokenmill.console import step
from tokenmill.errors import TokenmillError
from tokenmill.locks import exclusive


def doc_rules(corpus: Corpus, data: DataConfig) -> DocRules:
    e = corpus.entry
    return DocRules(e.format, e.text_field, data.normalize, data.min_chars, data.max_chars, data.on_decode_error, data.on_bad_record)


def output_dir(corpus: Corpus, tokenizer: TokenizerConfig, data: DataConfig, shards_root: Path, reuse_sha: str = "") -> Path:
    """Named by everything that decides the content; a reused tokenizer counts by its sha256,
    not by where its file happens to lie."""
    settings = tokenizer.model_dump(exclude={"reuse"}) if reuse_sha else tokenizer.model_dump()
    key = mf.content_key(mf.FORMAT, corpus.fingerprint, settings, data.model_dump(), reuse_sha or None)
    return Path(shards_root) / f"{corpus.name}-{key[:16]}"


def resolve_output(corpus: Corpus, tokenizer: TokenizerConfig, data: DataConfig, shards_root: Path,
                   reuse_tokenizer: Path | None) -> tuple[TokenizerConfig, Path | None, Path]:
    """The tokenizer settings in force, the tokenizer file to reuse (if any) and the output dir."""
    if reuse_tokenizer is not None:
        tokenizer = tokenizer.model_copy(update={"reuse": str(reuse_tokenizer)})
    reused = tok.resolve_reuse(tokenizer.reuse, Path(shards_root)) if tokenizer.reuse else None
    return tokenizer, reused, output_dir(corpus, tokenizer, data, shards_root, sha256_file(reused) if reused else "")


def verified_manifest_key(context, parameters: dict) -> str | None:
    """Prefect cache key: the output dir and its manifest's sha256, only while every shard verifies.

    A hit returns the stored manifest path without starting Dask; a missing or corrupted
    output gives no key, so the task runs and rebuilds what is missing.
    """
    if parameters.get("refresh") or parameters.get("classify") is not None:
        return None  # labelled shards: preprocess_labelled checks its own verified manifest
    _, _, out = resolve_output(parameters["corpus"], parameters["tokenizer"], parameters["data"],
                               parameters["shards_root"], parameters.get("reuse_tokenizer"))
    manifest = out / mf.MANIFEST
    return f"preprocess-{out.name}-{sha256_file(manifest)[:16]}" if mf.verify(manifest) else None


@task(name="preprocess", retries=2, retry_delay_seconds=[2, 10], retry_jitter_factor=0.5,
      retry_condition_fn=retry_transient, cache_key_fn=verified_manifest_key, persist_result=True,
      result_serializer="json")
def preprocess_corpus(
    corpus: Corpus,
    tokenizer: TokenizerConfig,
    data: DataConfig,
    shards_root: Path,
    dask_address: str | None = None,
    n_workers: int | None = None,
    refresh: bool = False,
    reuse_tokenizer: Path | None = None,
    classify: ClassifyConfig | None = None,
) -> Path:
    """The path of a verified manifest for this corpus and config, building it if needed;
    `refresh` discards an earlier build and recomputes everything. `reuse_tokenizer` (a
    tokenizer.model, e.g. the warm-start model's) takes the place of training one. With
    `classify`, the corpus is labelled and becomes one padded row per document instead."""
    if classify is not None:
        from tasks.preprocess_classify import preprocess_labelled  # it imports this module

        return preprocess_labelled(corpus, tokenizer, data, classify, shards_root, dask_address, n_workers, refresh,
                                   reuse_tokenizer)
    tokenizer, reused, out = resolve_output(corpus, tokenizer, data, shards_root, reuse_tokenizer)
    with exclusive(out, f"building {out}"):  # an overlapping run waits here, then reuses this build
        if (cached := mf.reuse_or_clear(out, refresh)) is not None:
            step(f"shards cached: {out} (verified)")
            return cached
        return build_shards(corpus, tokenizer, data, out, reused, dask_address, n_workers, refresh)


def build_shards(corpus: Corpus, tokenizer: TokenizerConfig, data: DataConfig, out: Path, reused: Path | None,
                 dask_address: str | None, n_workers: int | None, refresh: bool) -> Path:
    """Tokenizer, shards and, last, the manifest in `out`; returns the manifest's path."""
    if refresh:
        data = data.model_copy(update={"incremental": False})
    manifest_path = out / mf.MANIFEST
    started = time.time()
    rules = doc_rules(corpus, data)
    parts = plan_partitions(corpus.files, rules.format, data.partition_bytes)
    dirs = incremental.build_dirs(out, corpus.name) if data.incremental else [out]
    workers = local_workers(n_workers, len(parts))
    clock = Stopwatch()
    with client_in_background(dask_address, n_workers=workers) as connect:
        known = cached_hashes(parts, rules, dirs)
        tok_path, tok_sha = tokenizer_or_reason(connect, corpus, rules, tokenizer, data.seed, dirs, reused, parts)
        clock.lap("seconds_tokenizer")
        spec = encode.EncodeSpec(rules, str(tok_path), tok_sha, data.context_len + 1, data.val_fraction, str(out))
        todo = [p for p in parts if p.index not in known]
        if todo:
            connect()
            clock.lap("seconds_cluster_wait")
        guessed = first_pass(connect, todo, spec, len(parts))
        clock.lap("seconds_first_pass")
        hashes = [known[p.index] if p.index in known else guessed[p.index].hash_result() for p in parts]
        require_documents(corpus, hashes)
        results = settle_pass(connect, parts, hashes, guessed, spec, dirs)
        clock.lap("seconds_settle_pass")
    manifest = assemble_manifest(corpus, tokenizer, data, spec, parts, results, time.time() - started)
    manifest["stats"].update(clock.laps)
    write_json(manifest_path, manifest)
    shutil.rmtree(out / encode.SPANS, ignore_errors=True)  # only a repack in this run needed them
    remove_stale_temp_files(out, started)
    summarize(manifest)
    return manifest_path


def remove_stale_temp_files(out: Path, before: float) -> None:
    """Temp files a killed run left behind (hidden `.name.xxx.tmp`); never a file of a live writer."""
    for tmp in [*out.glob(".*.tmp"), *out.glob("*/.*.tmp")]:
        try:
            if tmp.stat().st_mtime < before:
                tmp.unlink()
        except FileNotFoundError:
            pass


class Stopwatch:
    """Seconds spent in each phase, for the manifest's stats."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 2)
        self._last = now


def cached_hashes(parts: list[Partition], rules: DocRules, dirs: list[Path]) -> dict[int, encode.HashResult]:
    """The document hashes of every partition whose input an earlier run already read."""
    known = {}
    for part in parts:
        cached = incremental.find_hashes(dirs, encode.source_key(part, rules))
        if cached is not None:
            known[part.index] = encode.load_hashes(part.index, cached)
    return known


def hash_pass(client, parts: list[Partition], rules: DocRules, dirs: list[Path]) -> list[encode.HashResult]:
    """Every partition's document hashes: from a cache where the partition's input is unchanged."""
    done = cached_hashes(parts, rules, dirs)
    todo = [(p, str(dirs[0] / encode.HASHES / f"{encode.source_key(p, rules)}.npz")) for p in parts if p.index not in done]
    if todo:
        futures = largest_first(client, encode.hash_partition, [(p, rules, dest) for p, dest in todo])
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
    why = "; ".join(f"{reason}: {text}" for reason, text in tally.problems().items()) or "every file is empty"
    raise TokenmillError(f"corpus '{corpus.name}' has no usable documents in {len(corpus.files)} files ({why})")


class EmptySample(TokenmillError):
    """Not one document of the corpus survived reading and filtering for the tokenizer's sample."""


def tokenizer_or_reason(connect, corpus: Corpus, rules: DocRules, cfg: TokenizerConfig, seed: int,
                        dirs: list[Path], reused: Path | None, parts: list[Partition]) -> tuple[Path, str]:
    """`obtain_tokenizer`; when there was nothing to train it on, why each file gave no document."""
    try:
        return obtain_tokenizer(corpus, rules, cfg, seed, dirs, reused)
    except EmptySample:
        require_documents(corpus, hash_pass(connect(), parts, rules, dirs))
        raise


def obtain_tokenizer(corpus: Corpus, rules: DocRules, cfg: TokenizerConfig, seed: int, dirs: list[Path],
                     reused: Path | None) -> tuple[Path, str]:
    """The tokenizer in the output dir: the one `reuse` names, an earlier build's, or a new one."""
    out = dirs[0]
    key = mf.content_key("tokenizer", cfg.model_dump(exclude={"reuse"}), rules.__dict__, seed)
    dest = out / "tokenizer.model"
    if reused is not None:
        step(f"tokenizer: reusing {reused}")
        incremental.link_or_copy(reused, dest)
        origin = str(reused)
    elif (found := incremental.find_tokenizer(dirs, key)) is not None:
        step(f"tokenizer: reusing {found[0]} (same settings)")
        incremental.link_or_copy(found[0], dest)
        origin = str(found[0])
    else:
        build_tokenizer(corpus, rules, cfg, seed, out)
        origin = "trained"
    check_tokenizer(dest)
    sha = sha256_file(dest)
    incremental.record_tokenizer(out, key, sha, origin)
    return dest, sha


def build_tokenizer(corpus: Corpus, rules: DocRules, cfg: TokenizerConfig, seed: int, out: Path) -> tuple[Path, str]:
    step(f"training {cfg.model_type} tokenizer (vocab {cfg.vocab_size}) on up to {cfg.sample_bytes / 1e6:.1f} MB of {corpus.name}")
    sample = tok.sample_sentences([f.path for f in corpus.files], rules, cfg.sample_bytes, seed)
    first = next(sample, None)
    if first is None:
        raise EmptySample(f"corpus '{corpus.name}' gave no text to train a tokenizer on")
    stopped: list[TokenmillError] = []

    def sentences():
        yield first
        try:
            yield from sample
        except TokenmillError as exc:  # a fatal bad record; SentencePiece would hide it in its own error
            stopped.append(exc)

    try:
        model = tok.train_sentencepiece(
            sentences(), cfg.vocab_size, cfg.model_type, cfg.byte_fallback, cfg.character_coverage, os.cpu_count() or 1
        )
    except ValueError as exc:
        if stopped:
            raise stopped[0] from None
        raise TokenmillError(
            f"tokenizer training failed ({exc}); lower tokenizer.vocab_size or raise tokenizer.sample_bytes or use a larger corpus"
        ) from None
    if stopped:
        raise stopped[0]
    path = out / "tokenizer.model"
    write_bytes(path, model)
    return path, sha256_file(path)


def check_tokenizer(path: Path) -> None:
    try:
        sp = tok.load(path.read_bytes())
    except (RuntimeError, OSError):
        raise TokenmillError(f"{path} is not a SentencePiece model; check tokenizer.reuse") from None
    if sp.eos_id() < 0:
        raise TokenmillError(f"tokenizer {path} has no end-of-document id (eos); train it with eos_id set")


def first_pass(connect, todo: list[Partition], spec: encode.EncodeSpec, n_parts: int) -> dict[int, encode.PartitionResult]:
    """Hash, encode and write the partitions whose hashes are not cached yet, each guessing that it
    repeats no document of an earlier partition; each is read once, and its hashes cached."""
    if not todo:
        return {}
    client = connect()
    mb = sum(p.nbytes for p in todo) / 1e6
    step(f"encoding {len(todo)} of {n_parts} partitions ({mb:.1f} MB) on {planned_workers(client)} Dask workers")
    hashes_dir = Path(spec.out_dir) / encode.HASHES
    calls = [(p, None, spec, "", str(hashes_dir / f"{encode.source_key(p, spec.rules)}.npz")) for p in todo]
    futures = largest_first(client, encode.encode_partition, calls)
    return {r.index: r for r in encode_progress(futures, {p.index: p.nbytes for p in todo})}


def settle_pass(connect, parts: list[Partition], hashes: list[encode.HashResult], guessed: dict[int, encode.PartitionResult],
                spec: encode.EncodeSpec, dirs: list[Path]) -> list[encode.PartitionResult]:
    """Every partition's shards with the corpus-wide dedup: a first-pass guess where it holds, else
    that guess repacked without the repeats, else a finished partition with the right encode
    key, else encoded."""
    drops = encode.find_duplicates([h.hashes for h in hashes])
    results: list[encode.PartitionResult] = []
    repack, encode_again = [], []
    for part, drop in zip(parts, drops):
        key = encode.encode_key(encode.source_key(part, spec.rules), drop, spec)
        guess = guessed.get(part.index)
        if guess is not None and guess.key == key:
            results.append(guess)
        elif guess is not None:  # it repeats an earlier partition: no record may name shards about to change
            (dirs[0] / encode.PARTS / f"{guess.key}.json").unlink(missing_ok=True)
            repack.append((replace(guess, hashes=None), drop, spec, key))
        elif (found := incremental.find_partition(dirs, key, part.index)) is not None:
            results.append(found)
        else:
            encode_again.append((part, drop, spec, key))
    step(f"dedup across partitions: {len(repack)} partitions repacked, {len(encode_again)} encoded, "
         f"{sum(r.reused for r in results)} reused")
    nbytes = {p.index: p.nbytes for p in parts}
    for fn, calls, label in ((encode.drop_repeats, repack, "repacking"), (encode.encode_partition, encode_again, "encoding")):
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
    sp = tok.load(Path(spec.tokenizer_path).read_bytes())
    stats["docs_out"] = stats["docs_train"] + stats["docs_val"]
    stats["duplicates"] = stats["dropped_duplicate"]
    stats["bytes_per_token"] = round(stats["bytes_out"] / max(1, stats["tokens"]), 4)
    stats["seconds"] = round(seconds, 2)
    stats["seconds_in_workers"] = round(stats["seconds_in_workers"], 2)  # encoding partitions, summed
    stats["partitions"] = len(results)
    stats["partitions_reused"] = sum(r.reused for r in results)
    stats["partitions_repacked"] = sum(r.repacked for r in results)
    record = json.loads((Path(spec.out_dir) / incremental.TOKENIZER_RECORD).read_text())
    return {
        "format": mf.FORMAT,
        "corpus": {"name": corpus.name, "fingerprint": corpus.fingerprint, "files": len(corpus.files), "bytes": corpus.total_bytes},
        "tokenizer": {"path": "tokenizer.model", "sha256": spec.tokenizer_sha256, "vocab_size": sp.get_piece_size(),
                      "eos_id": sp.eos_id(), "origin": record["origin"]},
        "row_len": spec.row_len,
        "dtype": str(tok.token_dtype(sp.get_piece_size())),
        "shards": shards,
        "partitions": [
            {"index": p.index, "key": r.key, "pieces": len(p.pieces), "bytes": p.nbytes, "reused": r.reused,
             "repacked": r.repacked}
            for p, r in zip(parts, results)
        ],
        "config": {"tokenizer": tokenizer.model_dump(), "data": data.model_dump(), "entry": corpus.entry.model_dump()},
        "stats": dict(stats),
        "problems": tally.problems(),
    }
