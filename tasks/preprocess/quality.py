"""Document quality filters in the style of Gopher and C4: pure functions of a document's text.

`failing_filter(doc, cfg)` is the first filter a document fails (its drop reason) or None; the
workers call it on every document before it is hashed or encoded, so a document that fails
is never encoded. The settings and presets live in tokenmill/data_quality.py. Each measure:

    word_count            words (split on whitespace)
    mean_word_length      characters per word
    symbol_ratio          '#' or '...' (and '…') per word, the larger of the two
    alpha_words           share of words with at least one letter
    alpha_chars           share of non-space characters that are letters (str.isalpha)
    bullet_lines          share of non-blank lines starting with a bullet (•, -, *, ...)
    ellipsis_lines        share of non-blank lines ending in '...' or '…'
    duplicate_lines       share of non-blank lines that repeat an earlier line
    duplicate_line_chars  share of characters of non-blank lines in such repeats
    top_ngram             per n: characters of the most frequent word n-gram, times its count,
                          over all word characters
    duplicate_ngram       per n: word characters covered by a repeat (not the first occurrence)
                          of some word n-gram

Measures are computed only for the filters that are on, cheapest first, and stop at the first
failure; the n-gram ones are vectorised with numpy over a document's word ids.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cached_property, lru_cache

import numpy as np

from tokenmill.data_quality import NgramFilter, QualityConfig, RangeFilter

BULLETS = ("•", "-", "*", "●", "‣", "◦", "▪", "·", "–")
ELLIPSES = ("...", "…")
_LETTERLESS_WORD = re.compile(r"(?<!\S)(?:[^\w\s]|[\d_])+(?!\S)")
_NGRAM_MIX = np.uint64(0x9E3779B97F4A7C15)
# For ASCII text (most text, nearly all code), characters are counted by deleting bytes in C
# (bytes.translate) instead of by regex: the whitespace str.split() splits on, and the letters.
_ASCII_SPACE = bytes(c for c in range(128) if chr(c).isspace())
_ASCII_NOT_LETTER = bytes(c for c in range(256) if not chr(c).isascii() or not chr(c).isalpha())


class Measures:
    """The measures of one document, each computed on first use."""

    def __init__(self, doc: str) -> None:
        self.doc = doc

    @cached_property
    def words(self) -> list[str]:
        return self.doc.split()

    @cached_property
    def lines(self) -> list[str]:
        return [line for line in map(str.strip, self.doc.splitlines()) if line]

    @cached_property
    def _repeated_lines(self) -> tuple[int, int]:
        """(lines, characters) of the non-blank lines that repeat an earlier one."""
        seen: set[str] = set()
        lines = chars = 0
        for line in self.lines:
            if line in seen:
                lines += 1
                chars += len(line)
            seen.add(line)
        return lines, chars

    @cached_property
    def word_lengths(self) -> np.ndarray:
        return np.fromiter(map(len, self.words), np.int64, count=len(self.words))

    @cached_property
    def _char_counts(self) -> tuple[int, int]:
        """(characters outside whitespace, which is the words' total length; letters). The ASCII
        part is counted by deleting bytes in C, and only the non-ASCII characters one by one."""
        if self.doc.isascii():
            ascii_part, others = self.doc.encode("ascii"), ""
        else:  # code points from UTF-32 with numpy: a regex over the whole text is 30x slower
            points = np.frombuffer(self.doc.encode("utf-32-le"), np.uint32)
            ascii_part = points[points < 128].astype(np.uint8).tobytes()
            others = "".join(map(chr, points[points >= 128].tolist()))
        visible = len(ascii_part.translate(None, _ASCII_SPACE)) + sum(not c.isspace() for c in others)
        return visible, len(ascii_part.translate(None, _ASCII_NOT_LETTER)) + sum(c.isalpha() for c in others)

    @property
    def visible_chars(self) -> int:
        return self._char_counts[0]

    def word_count(self) -> float:
        return len(self.words)

    def mean_word_length(self) -> float:
        return self.visible_chars / len(self.words) if self.words else 0.0

    def symbol_ratio(self) -> float:
        n = max(len(self.words), 1)
        return max(self.doc.count("#"), sum(self.doc.count(e) for e in ELLIPSES)) / n

    def alpha_words(self) -> float:
        return 1.0 - len(_LETTERLESS_WORD.findall(self.doc)) / max(len(self.words), 1)

    def alpha_chars(self) -> float:
        visible, letters = self._char_counts
        return letters / visible if visible else 0.0

    def bullet_lines(self) -> float:
        return sum(line.startswith(BULLETS) for line in self.lines) / max(len(self.lines), 1)

    def ellipsis_lines(self) -> float:
        return sum(line.endswith(ELLIPSES) for line in self.lines) / max(len(self.lines), 1)

    def duplicate_lines(self) -> float:
        return (len(self.lines) - len(set(self.lines))) / max(len(self.lines), 1)

    def duplicate_line_chars(self) -> float:
        return self._repeated_lines[1] / max(sum(map(len, self.lines)), 1)

    @cached_property
    def word_ids(self) -> np.ndarray:
        # Python's hash() is salted per process, but the measures depend only on which words are
        # equal, so they are the same in every process (up to 64-bit collisions).
        return np.fromiter(map(hash, self.words), np.int64, count=len(self.words)).view(np.uint64)

    def ngram_keys(self, n: int) -> np.ndarray:
        """One 64-bit key per word n-gram, in order (distinct n-grams collide with odds ~2^-64)."""
        ids = self.word_ids
        if len(ids) < n:
            return np.empty(0, np.uint64)
        keys = np.zeros(len(ids) - n + 1, np.uint64)
        for k in range(n):
            keys = keys * _NGRAM_MIX + ids[k : len(ids) - n + 1 + k] + np.uint64(1)
        return keys

    def top_ngram(self, n: int) -> float:
        keys = self.ngram_keys(n)
        if len(keys) < 2:
            return 0.0
        _, first, counts = np.unique(keys, return_index=True, return_counts=True)
        top = int(np.argmax(counts))
        if counts[top] < 2:
            return 0.0
        start = first[top]
        return float(counts[top] * self.word_lengths[start : start + n].sum() / self.word_lengths.sum())

    def duplicate_ngram(self, n: int) -> float:
        keys = self.ngram_keys(n)
        if len(keys) < 2:
            return 0.0
        _, first = np.unique(keys, return_index=True)
        repeat = np.ones(len(keys), bool)
        repeat[first] = False
        if not repeat.any():
            return 0.0
        # words covered by a repeated occurrence: +1 where one starts, -1 n words later
        edges = np.zeros(len(self.words) + 1, np.int64)
        starts = np.flatnonzero(repeat)
        np.add.at(edges, starts, 1)
        np.add.at(edges, starts + n, -1)
        covered = np.cumsum(edges[:-1]) > 0
        return float(self.word_lengths[covered].sum() / self.word_lengths.sum())


def _range_fails(value: float, f: RangeFilter) -> bool:
    return (f.min is not None and value < f.min) or (f.max is not None and value > f.max)


@lru_cache(maxsize=8)
def _active(cfg: QualityConfig) -> list[tuple[str, RangeFilter | NgramFilter]]:
    return cfg.active()


def failing_filter(doc: str, cfg: QualityConfig) -> str | None:
    """The name of the first active filter `doc` fails, or None when it passes them all."""
    active = _active(cfg)
    if not active:
        return None
    m = Measures(doc)
    for name, f in active:
        if isinstance(f, NgramFilter):
            measure: Callable[[int], float] = getattr(m, name)
            if any(measure(n) > limit for n, limit in sorted(f.max.items())):
                return name
        elif _range_fails(getattr(m, name)(), f):
            return name
    return None


def measure_all(doc: str, cfg: QualityConfig) -> dict[str, float]:
    """Every filter's measure of `doc` (n-gram ones at the n their settings name), for reports."""
    m = Measures(doc)
    out: dict[str, float] = {}
    for name, f in ((n, getattr(cfg, n)) for n in cfg.model_fields if n != "preset"):
        if isinstance(f, NgramFilter):
            out |= {f"{name}_{n}": round(getattr(m, name)(n), 4) for n in sorted(f.max)}
        else:
            out[name] = round(getattr(m, name)(), 4)
    return out
