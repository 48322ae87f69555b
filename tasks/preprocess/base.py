"""What building language-model and labelled shards share: the document rules, the output dir,
the tokenizer (reused, found in an earlier build, or trained), the manifest's common entries,
and the clean-up after a killed run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from data_catalog.loader import Corpus
from tasks.core import manifest as mf
from tasks.core.atomic import sha256_file, write_bytes
from tasks.core.tokenizer import load_tokenizer, resolve_reuse, token_dtype
from tasks.preprocess import incremental
from tasks.preprocess import tokenizer as tok
from tasks.preprocess.documents import DocRules
from tasks.preprocess.labelled import SPLIT_RULE
from tokenmill.config import ClassifyConfig, DataConfig, TokenizerConfig
from tokenmill.console import step
from tokenmill.errors import TokenmillError


def doc_rules(corpus: Corpus, data: DataConfig) -> DocRules:
    e = corpus.entry
    return DocRules(
        e.format, e.text_field, data.normalize, data.min_chars, data.max_chars, data.on_decode_error, data.on_bad_record
    )


def output_dir(
    corpus: Corpus,
    tokenizer: TokenizerConfig,
    data: DataConfig,
    shards_root: Path,
    reuse_sha: str = "",
    classify: ClassifyConfig | None = None,
) -> Path:
    """Named by everything that decides the content; a reused tokenizer counts by its sha256,
    not by where its file happens to lie. Labelled shards (`classify`) are also named by their
    split rule and row length, and not by the language model's context length."""
    settings = tokenizer.model_dump(exclude={"reuse"}) if reuse_sha else tokenizer.model_dump()
    if classify is None:
        key = mf.content_key(mf.FORMAT, corpus.fingerprint, settings, data.model_dump(), reuse_sha or None)
        return Path(shards_root) / f"{corpus.name}-{key[:16]}"
    key = mf.content_key(
        mf.FORMAT,
        "classify",
        SPLIT_RULE,
        corpus.fingerprint,
        settings,
        data.model_dump(exclude={"context_len"}),
        classify.max_len,
        reuse_sha or None,
    )
    return Path(shards_root) / f"{corpus.name}-cls-{key[:16]}"


def resolve_output(
    corpus: Corpus,
    tokenizer: TokenizerConfig,
    data: DataConfig,
    shards_root: Path,
    reuse_tokenizer: Path | None,
    classify: ClassifyConfig | None = None,
) -> tuple[TokenizerConfig, Path | None, Path]:
    """The tokenizer settings in force, the tokenizer file to reuse (if any) and the output dir."""
    if reuse_tokenizer is not None:
        tokenizer = tokenizer.model_copy(update={"reuse": str(reuse_tokenizer)})
    reused = resolve_reuse(tokenizer.reuse, Path(shards_root)) if tokenizer.reuse else None
    reuse_sha = sha256_file(reused) if reused else ""
    return tokenizer, reused, output_dir(corpus, tokenizer, data, shards_root, reuse_sha, classify)


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


class EmptySample(TokenmillError):
    """Not one document of the corpus survived reading and filtering for the tokenizer's sample."""


def obtain_tokenizer(
    corpus: Corpus, rules: DocRules, cfg: TokenizerConfig, seed: int, dirs: list[Path], reused: Path | None
) -> tuple[Path, str]:
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
    step(
        f"training {cfg.model_type} tokenizer (vocab {cfg.vocab_size}) on up to {cfg.sample_bytes / 1e6:.1f} MB "
        f"of {corpus.name}"
    )
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
            f"tokenizer training failed ({exc}); lower tokenizer.vocab_size or raise tokenizer.sample_bytes "
            f"or use a larger corpus"
        ) from None
    if stopped:
        raise stopped[0]
    path = out / "tokenizer.model"
    write_bytes(path, model)
    return path, sha256_file(path)


def check_tokenizer(path: Path) -> None:
    try:
        sp = load_tokenizer(path.read_bytes())
    except (RuntimeError, OSError):
        raise TokenmillError(f"{path} is not a SentencePiece model; check tokenizer.reuse") from None
    if sp.eos_id() < 0:
        raise TokenmillError(f"tokenizer {path} has no end-of-document id (eos); train it with eos_id set")


def corpus_record(corpus: Corpus) -> dict:
    """The manifest's `corpus` entry."""
    return {
        "name": corpus.name,
        "fingerprint": corpus.fingerprint,
        "files": len(corpus.files),
        "bytes": corpus.total_bytes,
    }


def tokenizer_record(tokenizer_path: str, tokenizer_sha256: str, out_dir: str) -> tuple[dict, str]:
    """The manifest's `tokenizer` entry and the shards' token dtype."""
    sp = load_tokenizer(Path(tokenizer_path).read_bytes())
    origin = json.loads((Path(out_dir) / incremental.TOKENIZER_RECORD).read_text())["origin"]
    entry = {
        "path": "tokenizer.model",
        "sha256": tokenizer_sha256,
        "vocab_size": sp.get_piece_size(),
        "eos_id": sp.eos_id(),
        "origin": origin,
    }
    return entry, str(token_dtype(sp.get_piece_size()))
