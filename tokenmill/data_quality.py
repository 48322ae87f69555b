"""Typed settings of corpus quality: near-duplicate removal and the document filters, with the
filter presets (data, not code paths). `DataConfig` holds one of each (`data.near_dup`,
`data.quality`); the preprocessing workers apply them (tasks/preprocess/quality.py, near_dup.py).

    data:
      near_dup: {threshold: 0.8, ngram: 5}
      quality: {preset: prose, word_count: {min: 20}, symbol_ratio: false}

A filter set by a catalog entry or `--set` is layered over its preset's setting field by field
and is on unless it says `enabled: false`; `false` turns a filter off and `true` turns on the
preset's setting.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The filters in the order they are tried (cheapest first); a document's drop reason is the
# first one it fails, and that name is also its `dropped/<reason>.jsonl`.
RANGE_FILTERS = (
    "word_count",
    "mean_word_length",
    "symbol_ratio",
    "alpha_words",
    "alpha_chars",
    "bullet_lines",
    "ellipsis_lines",
    "duplicate_lines",
    "duplicate_line_chars",
)
NGRAM_FILTERS = ("top_ngram", "duplicate_ngram")
FILTERS = RANGE_FILTERS + NGRAM_FILTERS
RATIOS = set(RANGE_FILTERS) - {"word_count", "mean_word_length", "symbol_ratio"}
NGRAM_SIZES = {"top_ngram": range(1, 11), "duplicate_ngram": range(2, 21)}

_OFF: dict[str, Any] = {"enabled": False}
# Gopher: Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training
# Gopher", appendix A.1.1 ("quality filtering" and "repetition removal"); the same numbers as
# datatrove's GopherQualityFilter and GopherRepetitionFilter.
_GOPHER: dict[str, dict[str, Any]] = {
    "word_count": {"min": 50, "max": 100_000},
    "mean_word_length": {"min": 3, "max": 10},
    "symbol_ratio": {"max": 0.1},  # '#' and '...' each, per word
    "alpha_words": {"min": 0.8},  # words with at least one letter
    "alpha_chars": _OFF,  # Gopher counts words, not characters (alpha_words)
    "bullet_lines": {"max": 0.9},
    "ellipsis_lines": {"max": 0.3},
    "duplicate_lines": {"max": 0.3},
    "duplicate_line_chars": {"max": 0.2},
    "top_ngram": {"max": {2: 0.20, 3: 0.18, 4: 0.16}},
    "duplicate_ngram": {"max": {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}},
}
# Source code: '#' comments, '*'/'-' at line starts, short tokens and repeated lines (`return`,
# `}`, `pass`) are normal there, so only what is clearly not source is dropped: data tables and
# encoded blobs (alpha_chars, mean_word_length) and files that are one line or block repeated
# (duplicate_lines). Each limit lies beyond the most extreme file of CPython
# 3.11's standard library (1758 files: alpha_chars >= 0.37, mean_word_length <= 37.3,
# duplicate_lines <= 0.88, duplicate 10-grams <= 0.62), so that corpus loses nothing to them.
_CODE: dict[str, dict[str, Any]] = {
    "word_count": {"min": 1},
    "mean_word_length": {"max": 50},
    "symbol_ratio": _OFF,
    "alpha_words": _OFF,
    "alpha_chars": {"min": 0.25},
    "bullet_lines": _OFF,
    "ellipsis_lines": _OFF,
    "duplicate_lines": {"max": 0.95},
    "duplicate_line_chars": _OFF,
    "top_ngram": _OFF,
    "duplicate_ngram": _OFF,  # a repeated block is a repeated line too, and this one is dear to compute
}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "none": {name: _OFF for name in FILTERS},
    "code": _CODE,
    "prose": _GOPHER,
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NearDupConfig(_Section):
    """MinHash near-duplicate removal across the whole corpus (tasks/preprocess/near_dup.py)."""

    enabled: bool = True
    threshold: float = Field(
        0.8, ge=0.3, le=0.99, description="estimated Jaccard similarity of word n-grams at which a document is a copy"
    )
    ngram: int = Field(5, ge=1, le=32, description="words per shingle; documents with fewer words are left alone")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash values per document")


class RangeFilter(_Section):
    """Drop a document whose measure is below `min` or above `max` (either may be unset)."""

    enabled: bool = True
    min: float | None = None
    max: float | None = None


class NgramFilter(_Section):
    """Drop a document when, for any n listed, its n-gram measure is above the limit."""

    enabled: bool = True
    max: dict[int, float] = {}

    def __hash__(self) -> int:  # frozen settings stay hashable, as the rest of DataConfig is
        return hash((self.enabled, tuple(sorted(self.max.items()))))


class QualityConfig(_Section):
    """Document filters in the style of Gopher and C4, each on or off; `preset` fills what is not set."""

    preset: Literal["none", "code", "prose"] = Field("none", description="none, code (source code) or prose (Gopher)")
    word_count: RangeFilter = RangeFilter(enabled=False)
    mean_word_length: RangeFilter = RangeFilter(enabled=False)
    symbol_ratio: RangeFilter = RangeFilter(enabled=False)
    alpha_words: RangeFilter = RangeFilter(enabled=False)
    alpha_chars: RangeFilter = RangeFilter(enabled=False)
    bullet_lines: RangeFilter = RangeFilter(enabled=False)
    ellipsis_lines: RangeFilter = RangeFilter(enabled=False)
    duplicate_lines: RangeFilter = RangeFilter(enabled=False)
    duplicate_line_chars: RangeFilter = RangeFilter(enabled=False)
    top_ngram: NgramFilter = NgramFilter(enabled=False)
    duplicate_ngram: NgramFilter = NgramFilter(enabled=False)

    @model_validator(mode="before")
    @classmethod
    def _layer_over_preset(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        preset = value.get("preset", "none")
        if preset not in PRESETS:
            return value  # the Literal names the choices
        unknown = sorted(set(value) - {"preset", *FILTERS})
        if unknown:
            raise ValueError(f"unknown filter '{unknown[0]}'; choose from {', '.join(FILTERS)}")
        out: dict[str, Any] = {"preset": preset}
        for name in FILTERS:
            base = {"enabled": True, **PRESETS[preset][name]}
            override = value.get(name)
            if isinstance(override, bool):
                override = {"enabled": override}
            out[name] = {**base, "enabled": True, **override} if isinstance(override, dict) else (override or base)
        return out

    @model_validator(mode="after")
    def _thresholds(self) -> QualityConfig:
        for name in RANGE_FILTERS:
            f: RangeFilter = getattr(self, name)
            for bound in (f.min, f.max):
                if bound is not None and (bound < 0 or (name in RATIOS and bound > 1)):
                    limit = "between 0 and 1" if name in RATIOS else "at least 0"
                    raise ValueError(f"{name}: min and max must be {limit}, not {bound}")
            if f.min is not None and f.max is not None and f.min > f.max:
                raise ValueError(f"{name}: min ({f.min}) must not exceed max ({f.max})")
        for name in NGRAM_FILTERS:
            for n, limit in getattr(self, name).max.items():
                sizes = NGRAM_SIZES[name]
                if n not in sizes or not 0 <= limit <= 1:
                    raise ValueError(
                        f"{name}: each limit must be n: fraction with n in {sizes.start}..{sizes.stop - 1} "
                        f"and a fraction between 0 and 1, not {n}: {limit}"
                    )
        return self

    def active(self) -> list[tuple[str, RangeFilter | NgramFilter]]:
        """The enabled filters with a limit, in the order they are tried."""
        out = []
        for name in FILTERS:
            f = getattr(self, name)
            limited = f.max if isinstance(f, NgramFilter) else (f.min is not None or f.max is not None)
            if f.enabled and limited:
                out.append((name, f))
        return out
