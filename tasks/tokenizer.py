"""Train, load, find and describe the SentencePiece tokenizer.

Training reads a deterministic, bounded sample of the corpus, so its memory does not grow
with the corpus. Normalization is the identity and no dummy prefix is added, so decoding
gives back the exact text and every piece has an exact UTF-8 byte length (for bits/byte).
A tokenizer can also be reused (`tokenizer.reuse`): a model file, a shards directory or
manifest, or the name of a corpus whose latest build holds one.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from tasks.documents import DocRules, Tally, read_documents
from tokenmill.errors import TokenmillError

SENTENCE_CHARS = 2000  # SentencePiece caps sentence length; long documents are cut at lines


def sample_sentences(paths: list[str], rules: DocRules, sample_bytes: int, seed: int) -> Iterator[str]:
    """Up to `sample_bytes` of text, from files in a seeded but stable order, in line-aligned chunks."""

    def order(p: str) -> str:
        return hashlib.sha1(f"{seed}:{p}".encode()).hexdigest()

    taken = 0
    tally = Tally()
    for path in sorted(paths, key=order):
        for doc in read_documents(path, rules, tally):
            for chunk in chunk_lines(doc, SENTENCE_CHARS):
                yield chunk
                taken += len(chunk.encode("utf-8"))
                if taken >= sample_bytes:
                    return


def chunk_lines(doc: str, limit: int) -> Iterator[str]:
    """Cut a document into pieces of at most about `limit` chars, at line ends where possible."""
    buf: list[str] = []
    size = 0
    for line in doc.splitlines(keepends=True):
        while len(line) > limit:
            if buf:
                yield "".join(buf)
                buf, size = [], 0
            yield line[:limit]
            line = line[limit:]
        if size + len(line) > limit and buf:
            yield "".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += len(line)
    if buf:
        yield "".join(buf)


def train_sentencepiece(
    sentences: Iterable[str],
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    character_coverage: float = 0.9995,
    num_threads: int = 2,
) -> bytes:
    """The serialized model proto. Raises ValueError when the sample cannot fill the vocab."""
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=out,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=4 * SENTENCE_CHARS,
            input_sentence_size=0,
            num_threads=num_threads,
            unk_id=0,
            bos_id=-1,
            eos_id=1,
            pad_id=-1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise ValueError(str(exc).strip().splitlines()[-1]) from None
    return out.getvalue()


def load(model_bytes: bytes) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=model_bytes)


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
    builds = sorted(Path(shards_root).glob(f"{reuse}-*/manifest.json"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
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
