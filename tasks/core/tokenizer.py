"""The SentencePiece tokenizer as the shards and every stage see it: load one, the byte length
of each piece (for bits per byte), the token dtype of the shards, and the tokenizer a
`tokenizer.reuse` setting names (a model file, a shards directory or manifest, or the name of
a corpus whose latest build holds one).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import sentencepiece as spm

from tokenmill.errors import TokenmillError


def load_tokenizer(model_bytes: bytes) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=model_bytes)


@functools.lru_cache(maxsize=2)
def worker_tokenizer(path: str, sha256: str) -> spm.SentencePieceProcessor:
    """The tokenizer at `path`, loaded once per worker process; the sha256 is in the cache key,
    so a new tokenizer is never served stale."""
    return load_tokenizer(Path(path).read_bytes())


def piece_byte_lengths(sp: spm.SentencePieceProcessor) -> np.ndarray:
    """UTF-8 bytes each id decodes to: 1 for byte pieces, 0 for control pieces."""
    lengths = np.zeros(sp.get_piece_size(), dtype=np.int64)
    for i in range(sp.get_piece_size()):
        if sp.is_control(i):
            continue
        if sp.is_byte(i) or sp.is_unknown(i):
            lengths[i] = 1
            continue
        lengths[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return lengths


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def resolve_reuse(reuse: str, shards_root: Path) -> Path:
    """The tokenizer.model that `tokenizer.reuse` names; a clear error when there is none."""
    given = Path(reuse).expanduser()
    if given.is_file() and given.name != "manifest.json":
        return given
    manifest = given / "manifest.json" if given.is_dir() else given
    if manifest.is_file():
        return _manifest_tokenizer(manifest)
    builds = sorted(
        Path(shards_root).glob(f"{reuse}-*/manifest.json"), key=lambda p: p.stat().st_mtime_ns, reverse=True
    )
    for manifest in builds:
        try:
            return _manifest_tokenizer(manifest)
        except TokenmillError:
            continue
    raise TokenmillError(
        f"tokenizer.reuse '{reuse}' is neither a tokenizer file, a shards directory nor a preprocessed corpus "
        f"under {shards_root}; run `tokenmill preprocess {reuse}` first or give a tokenizer.model path"
    )


def _manifest_tokenizer(manifest: Path) -> Path:
    try:
        meta = json.loads(manifest.read_text())["tokenizer"]
        path = manifest.parent / meta["path"]
    except (OSError, ValueError, KeyError, TypeError):
        raise TokenmillError(f"tokenizer.reuse: {manifest} is not a tokenmill manifest") from None
    if not path.is_file():
        raise TokenmillError(f"tokenizer.reuse: {manifest} names {path}, which is missing; rebuild that corpus")
    return path
