"""Preprocessing stage: corpus files -> SentencePiece tokenizer -> Arrow shards + manifest.

The output directory is named by a hash of everything that determines its content (corpus
fingerprint, tokenizer and data settings), so a verified manifest there is a cache hit and
preprocessing is skipped. Work runs on Dask in two passes: hash every document (for exact
dedup across the corpus), then encode and write shards. The manifest is written last.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from data_catalog.loader import Corpus
from tasks import encode, manifest as mf, tokenizer as tok
from tasks.atomic import sha256_file, write_bytes, write_json
from tasks.cluster import dask_client
from tasks.documents import DocRules
from tasks.policy import retry_transient
from tokenmill.config import DataConfig, TokenizerConfig
from tokenmill.console import progress, step
from tokenmill.errors import TokenmillError


def doc_rules(corpus: Corpus, data: DataConfig) -> DocRules:
    e = corpus.entry
    return DocRules(e.format, e.text_field, data.normalize, data.min_chars, data.max_chars)


def output_dir(corpus: Corpus, tokenizer: TokenizerConfig, data: DataConfig, shards_root: Path) -> Path:
    key = mf.content_key(mf.FORMAT, corpus.fingerprint, tokenizer.model_dump(), data.model_dump())
    return Path(shards_root) / f"{corpus.name}-{key[:16]}"


@task(name="preprocess", retries=2, retry_delay_seconds=[2, 10], retry_jitter_factor=0.5,
      retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def preprocess_corpus(
    corpus: Corpus,
    tokenizer: TokenizerConfig,
    data: DataConfig,
    shards_root: Path,
    dask_address: str | None = None,
) -> Path:
    """The path of a verified manifest for this corpus and config, building it if needed."""
    out = output_dir(corpus, tokenizer, data, shards_root)
    manifest_path = out / mf.MANIFEST
    if mf.verify(manifest_path):
        step(f"shards cached: {out} (verified)")
        return manifest_path
    started = time.time()
    rules = doc_rules(corpus, data)
    tok_path, tok_sha = build_tokenizer(corpus, rules, tokenizer, data.seed, out)
    spec = encode.EncodeSpec(rules, str(tok_path), tok_sha, data.context_len + 1, data.val_fraction, str(out))
    parts = encode.plan_partitions([(f.path, f.size) for f in corpus.files], data.partition_bytes)
    results = run_partitions(parts, spec, dask_address)
    manifest = assemble_manifest(corpus, tokenizer, data, spec, results, time.time() - started)
    write_json(manifest_path, manifest)
    return manifest_path


def build_tokenizer(corpus: Corpus, rules: DocRules, cfg: TokenizerConfig, seed: int, out: Path) -> tuple[Path, str]:
    step(f"training {cfg.model_type} tokenizer (vocab {cfg.vocab_size}) on up to {cfg.sample_bytes / 1e6:.1f} MB of {corpus.name}")
    sample = tok.sample_sentences([f.path for f in corpus.files], rules, cfg.sample_bytes, seed)
    try:
        model = tok.train_sentencepiece(
            sample, cfg.vocab_size, cfg.model_type, cfg.byte_fallback, cfg.character_coverage, os.cpu_count() or 1
        )
    except ValueError as exc:
        raise TokenmillError(
            f"tokenizer training failed ({exc}); lower tokenizer.vocab_size or use a larger corpus"
        ) from None
    path = out / "tokenizer.model"
    write_bytes(path, model)
    return path, sha256_file(path)


def run_partitions(parts: list[encode.Partition], spec: encode.EncodeSpec, address: str | None) -> list[encode.PartitionResult]:
    from distributed import as_completed

    total_mb = sum(p.nbytes for p in parts) / 1e6
    with dask_client(address, n_workers=min(len(parts), os.cpu_count() or 1)) as client:
        step(f"dedup pass over {len(parts)} partitions ({total_mb:.1f} MB) on {len(client.scheduler_info()['workers'])} Dask workers")
        hashes = client.gather(client.map(encode.hash_partition, parts, rules=spec.rules, pure=False))
        drops = encode.find_duplicates(hashes)
        futures = client.map(encode.encode_partition, parts, drops, spec=spec, pure=False)
        results = []
        with progress() as bar:
            job = bar.add_task("encoding", total=len(parts))
            for future in as_completed(futures):
                results.append(future.result())
                bar.advance(job)
    return sorted(results, key=lambda r: r.index)


def assemble_manifest(corpus, tokenizer, data, spec, results, seconds: float) -> dict:
    stats: Counter = Counter()
    for r in results:
        stats.update(r.stats)
    shards = [s for r in results for s in r.shards]
    if not any(s["split"] == "val" for s in shards):
        raise TokenmillError(
            f"corpus '{corpus.name}' left no validation rows; raise data.val_fraction or lower data.context_len"
        )
    if not any(s["split"] == "train" for s in shards):
        raise TokenmillError(f"corpus '{corpus.name}' left no training rows; add data or lower data.context_len")
    sp = tok.load(Path(spec.tokenizer_path).read_bytes())
    stats["bytes_per_token"] = round(stats["bytes_out"] / max(1, stats["tokens"]), 4)
    stats["seconds"] = round(seconds, 2)
    return {
        "format": mf.FORMAT,
        "corpus": {"name": corpus.name, "fingerprint": corpus.fingerprint, "files": len(corpus.files), "bytes": corpus.total_bytes},
        "tokenizer": {"path": "tokenizer.model", "sha256": spec.tokenizer_sha256, "vocab_size": sp.get_piece_size(), "eos_id": sp.eos_id()},
        "row_len": spec.row_len,
        "dtype": str(tok.token_dtype(sp.get_piece_size())),
        "shards": shards,
        "config": {"tokenizer": tokenizer.model_dump(), "data": data.model_dump(), "entry": corpus.entry.model_dump()},
        "stats": dict(stats),
    }
