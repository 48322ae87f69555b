"""Train the SentencePiece tokenizer (loading, finding and describing one: `tasks.core.tokenizer`).

Training reads a deterministic, bounded sample of the corpus, so its memory does not grow
with the corpus. Normalization is the identity and no dummy prefix is added, so decoding
gives back the exact text and every piece has an exact UTF-8 byte length (for bits/byte).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from tasks.preprocess.documents import DocRules, Tally, read_documents

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
