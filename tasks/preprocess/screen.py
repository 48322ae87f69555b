"""What a worker does to each document before it is hashed or encoded: the quality filters, the
MinHash signature for near-duplicate removal, and a bounded sample of what it dropped.

`Screen` is the small, picklable setting (from `DataConfig.quality` and `.near_dup`);
`Screening` is one partition's pass: it rejects documents that fail a filter (counting documents
and bytes per reason, and offering each to the sample), and batches kept documents into
signatures. Samples are bottom-k by a seeded hash of the text, so merging every partition's
sample gives the same documents however the partitions were spread over workers.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tasks.preprocess import near_dup
from tasks.preprocess.documents import doc_hash
from tasks.preprocess.quality import failing_filter
from tokenmill.config import DataConfig
from tokenmill.data_quality import NearDupConfig, QualityConfig

EXCERPT_CHARS = 600
SIGNATURE_BATCH_CHARS = 1 << 20
_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class Screen:
    quality: QualityConfig = field(default_factory=QualityConfig)
    near_dup: NearDupConfig = field(default_factory=lambda: NearDupConfig(enabled=False))
    seed: int = 0
    sample: int = 0  # dropped documents kept per reason

    def identity(self) -> list | None:
        """What decides which documents a partition keeps and their signatures (not the LSH
        threshold, which only the client uses); None when nothing is screened."""
        parts: list = []
        if self.quality.active():
            parts.append(["quality", self.quality.model_dump(mode="json", exclude={"preset"}), self.sample, self.seed])
        if self.near_dup.enabled:
            parts.append(["minhash", self.near_dup.ngram, self.near_dup.num_perm])
        return parts or None


def screen_of(data: DataConfig) -> Screen:
    return Screen(data.quality, data.near_dup, data.seed, data.drop_sample)


def priority(h: int, seed: int) -> int:
    """A seeded 64-bit rank of a document hash: the sample keeps the lowest."""
    x = (h ^ (seed * 0x9E3779B97F4A7C15)) & _MASK
    x = ((x ^ (x >> 31)) * 0xBF58476D1CE4E5B9) & _MASK
    return x ^ (x >> 29)


def excerpt(doc: str) -> str:
    return doc if len(doc) <= EXCERPT_CHARS else doc[:EXCERPT_CHARS] + "…"


def sample_entry(reason: str, doc: str, where: str, seed: int) -> dict:
    return {
        "reason": reason,
        "where": where,
        "bytes": len(doc.encode("utf-8")),
        "text": excerpt(doc),
        "priority": priority(doc_hash(doc), seed),
    }


def bottom_k(entries: list[dict], k: int) -> list[dict]:
    """The k entries of lowest (priority, where): mergeable, and independent of arrival order."""
    return sorted(entries, key=lambda e: (e["priority"], e["where"]))[:k]


def merge_samples(samples: list[dict[str, list[dict]]], k: int) -> dict[str, list[dict]]:
    by_reason: dict[str, list[dict]] = {}
    for sample in samples:
        for reason, entries in sample.items():
            by_reason.setdefault(reason, []).extend(entries)
    return {reason: bottom_k(entries, k) for reason, entries in sorted(by_reason.items())}


class Screening:
    """One partition's screening: filters, signature batches and the sample of drops."""

    def __init__(self, screen: Screen | None, signatures: bool) -> None:
        self.screen = screen
        self.filtering = bool(screen and screen.quality.active())
        self.signing = bool(signatures and screen and screen.near_dup.enabled)
        self.stats: Counter = Counter()
        self.samples: dict[str, list[dict]] = {}
        self._batch: list[str] = []
        self._chars = 0
        self._rows: list[np.ndarray] = []

    def rejects(self, doc: str, where: str) -> bool:
        """True (and counted) when the document fails a quality filter."""
        if not self.filtering:
            return False
        started = time.perf_counter()
        reason = failing_filter(doc, self.screen.quality)
        self.stats["seconds_filters"] += time.perf_counter() - started
        if reason is None:
            return False
        self.drop(reason, doc, where)
        return True

    def drop(self, reason: str, doc: str, where: str) -> None:
        self.stats[f"dropped_{reason}"] += 1
        self.stats[f"bytes_dropped_{reason}"] += len(doc.encode("utf-8"))
        if self.screen and self.screen.sample:
            kept = self.samples.setdefault(reason, [])
            kept.append(sample_entry(reason, doc, where, self.screen.seed))
            if len(kept) > 2 * self.screen.sample:
                self.samples[reason] = bottom_k(kept, self.screen.sample)

    def add(self, doc: str) -> None:
        """A kept document (in hash order) whose signature the near-duplicate search needs."""
        if not self.signing:
            return
        self._batch.append(doc)
        self._chars += len(doc)
        if self._chars >= SIGNATURE_BATCH_CHARS:
            self._flush()

    def _flush(self) -> None:
        if self._batch:
            started = time.perf_counter()
            self._rows.append(near_dup.signatures(self._batch, self.screen.near_dup))
            self.stats["seconds_signatures"] += time.perf_counter() - started
            self._batch, self._chars = [], 0

    def signatures(self) -> np.ndarray | None:
        if not self.signing:
            return None
        self._flush()
        k = self.screen.near_dup.num_perm
        return np.concatenate(self._rows) if self._rows else np.empty((0, k), np.uint32)

    def final_samples(self) -> dict[str, list[dict]]:
        k = self.screen.sample if self.screen else 0
        return {reason: bottom_k(entries, k) for reason, entries in sorted(self.samples.items()) if k}
