"""Small builders shared by the preprocessing tests: files, generated text, compression."""

from __future__ import annotations

import bz2
import gzip
import random
from pathlib import Path

import zstandard

WORDS = [
    "river",
    "stone",
    "light",
    "garden",
    "number",
    "return",
    "value",
    "index",
    "café",
    "naïve",
    "Straße",
    "日本語",
    "данные",
    "λόγος",
    "x1",
    "42",
    "2024",
    "self",
    "None",
    "count",
]

COMPRESS = {
    "": lambda b: b,
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".zst": lambda b: zstandard.ZstdCompressor().compress(b),
}


def write(path: Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes, compressed by the path's extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    suffix = next((s for s in (".gz", ".bz2", ".zst") if path.name.endswith(s)), "")
    path.write_bytes(COMPRESS[suffix](raw))
    return path


def varied_text(seed: int, n_lines: int) -> str:
    """Code-like lines with indentation, tabs, digits, punctuation and non-ASCII words."""
    r = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        indent = r.choice(["", "  ", "    ", "\t", "\t\t"])
        words = [r.choice(WORDS) for _ in range(r.randint(2, 8))]
        lines.append(indent + r.choice([" ", ", ", "_"]).join(words) + r.choice(["", ".", ":", " = 0", "()"]))
    return "\n".join(lines) + "\n"


def sentence(r: random.Random, i: int) -> str:
    return f"{i} " + " ".join(r.choice(WORDS) for _ in range(r.randint(3, 9)))


def python_like_module(r: random.Random, i: int) -> str:
    names = ["alpha", "beta", "gamma", "delta", "count", "items", "value", "result", "total", "index", "name", "data"]
    lines = [f"# module {i}: helpers for the {r.choice(names)} table", "import os", ""]
    for j in range(r.randint(22, 30)):
        fn = f"{r.choice(names)}_{r.choice(names)}_{j}"
        lines += [
            f"def {fn}({r.choice(names)}, {r.choice(names)}=None):",
            f'    """Return the {r.choice(names)} of {r.choice(names)} ({r.randint(0, 9999)})."""',
            f"    for {r.choice(names)} in range({r.randint(1, 99)}):",
            f"        {r.choice(names)} += {r.randint(0, 999)} * {r.choice(names)}",
            f"    return {r.choice(names)}",
            "",
        ]
    return "\n".join(lines) + "\n"


def small_tokenizer(root: Path):
    """A byte-fallback BPE model of 384 pieces trained on a few KB of generated text, saved to disk."""
    from tasks.core.atomic import sha256_file
    from tasks.core.tokenizer import load_tokenizer
    from tasks.preprocess import tokenizer as tok
    from tasks.preprocess.documents import DocRules

    paths = [str(write(root / f"src{i}.txt", varied_text(i, 60))) for i in range(4)]
    sentences = list(tok.sample_sentences(paths, DocRules(), sample_bytes=50_000, seed=1))
    model = tok.train_sentencepiece(sentences, vocab_size=384, num_threads=1)
    path = write(root / "tokenizer.model", model)
    return path, sha256_file(path), load_tokenizer(model)
