"""Near-duplicate documents across a corpus: MinHash signatures of word n-grams, LSH, clusters.

Workers call `signatures(docs, cfg)` on batches of documents in the pass that encodes them (the
rows are cached beside the partition's exact-dedup hashes); the client then calls
`near_duplicates` once over every partition's signatures. Documents are lower-cased and cut
into words (runs of letters, digits, '_' and non-ASCII); a shingle is `cfg.ngram` consecutive
words, and a document with fewer words has none and is left to exact dedup.

Why plain numpy, and not datasketch or rensa: datasketch hashes each shingle `num_perm` times
in a per-document Python loop (on these 2 cores that alone would cost about as much as
SentencePiece encoding), and rensa is a compiled Rust wheel the project would have to pin and
ship to every Dask worker. Here one batch of documents is hashed at a time with numpy and no
new dependency: a word by its length and its first and last 8 bytes (little-endian loads,
mixed with SplitMix64's finaliser; never Python's salted hash() or a numpy RNG stream, so the
values are the same on every machine and numpy version; words longer than 16 bytes that agree
in both ends and length share a hash, which only ever adds a little similarity), and the
signature by one-permutation hashing (each shingle hashed once, into one of `num_perm` bins)
with densification by rotation (Shrivastava and Li, ICML 2014), so two documents agree in a
slot with probability equal to their Jaccard similarity.

LSH splits a signature into `bands` x `rows` (`lsh_params`, chosen as datasketch does, by
minimising a weighted sum of the false-positive and false-negative areas under the S-curve;
weighted towards recall, since every candidate pair is then verified: its estimated Jaccard,
the share of equal slots, must reach the threshold). Verified pairs are joined into clusters
with union-find, and each cluster keeps only its first document in corpus order (partition
index, then position), so what is dropped never depends on how many workers ran. Since one
document survives per cluster, no validation document has a near-duplicate in training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tokenmill.data_quality import NearDupConfig

EMPTY = np.uint32(0xFFFFFFFF)  # the slot of a document with no shingle
_LOW_BYTES = np.array([(1 << (8 * i)) - 1 for i in range(9)], np.uint64)
_WORD_BYTE = np.zeros(256, bool)
_WORD_BYTE[[*b"0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", *range(0x80, 0x100)]] = True
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
FP_WEIGHT, FN_WEIGHT = 0.2, 0.8


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: every input bit reaches every output bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingles(docs: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hash, document index) of every word n-gram of the documents, in order."""
    encoded = [d.lower().encode("utf-8") for d in docs]
    starts = np.cumsum([0] + [len(e) + 1 for e in encoded[:-1]])
    blob = b"\n".join(encoded) + bytes(8)
    n = len(blob) - 8
    is_word = _WORD_BYTE[np.frombuffer(blob, np.uint8, count=n)].view(np.int8)
    edges = np.flatnonzero(np.diff(is_word, prepend=np.int8(0), append=np.int8(0)))
    begin, end = edges[::2], edges[1::2]
    # every word's first and last 8 bytes, as unaligned little-endian loads, and its length
    loads = np.ndarray((n + 1,), "<u8", buffer=blob, strides=(1,))
    length = end - begin
    head = loads[begin] & _LOW_BYTES[np.minimum(length, 8)]
    tail = np.where(length > 8, loads[np.maximum(end - 8, 0)], np.uint64(0))
    words = _mix(head ^ _mix(tail ^ (length.astype(np.uint64) * _GOLDEN)))
    word_doc = np.searchsorted(starts, begin, side="right") - 1
    m = len(words) - ngram + 1
    if m <= 0:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    acc = np.zeros(m, np.uint64)
    for k in range(ngram):
        acc = acc * _GOLDEN + words[k : k + m]
    within = word_doc[:m] == word_doc[ngram - 1 :]
    return _mix(acc[within]), word_doc[:m][within]


def signatures(docs: list[str], cfg: NearDupConfig) -> np.ndarray:
    """(len(docs), num_perm) uint32 MinHash signatures; a document with no shingle gets EMPTY."""
    k = cfg.num_perm
    sig = np.full((len(docs), k), EMPTY, np.uint32)
    hashes, doc = shingles(docs, cfg.ngram)
    if not len(hashes):
        return sig
    slot = ((hashes >> np.uint64(32)) * np.uint64(k)) >> np.uint64(32)
    value = np.minimum(hashes & np.uint64(0xFFFFFFFF), np.uint64(EMPTY) - np.uint64(1)).astype(np.uint32)
    np.minimum.at(sig.reshape(-1), doc * k + slot.astype(np.int64), value)
    return _densify(sig)


def _densify(sig: np.ndarray) -> np.ndarray:
    """Each empty slot of a non-empty document takes the next filled slot to its right (wrapping),
    re-hashed with the distance, so equal slots stay as likely as the documents' Jaccard."""
    filled = sig != EMPTY
    rows = np.flatnonzero(filled.any(axis=1) & ~filled.all(axis=1))
    if not len(rows):
        return sig
    k = sig.shape[1]
    twice = np.concatenate([filled[rows], filled[rows]], axis=1)
    where = np.where(twice, np.arange(2 * k), 2 * k)
    nearest = np.minimum.accumulate(where[:, ::-1], axis=1)[:, ::-1][:, :k]
    source = np.take_along_axis(sig[rows], nearest % k, axis=1).astype(np.uint64)
    distance = (nearest - np.arange(k)).astype(np.uint64)
    moved = (_mix(source + distance * _GOLDEN) >> np.uint64(32)).astype(np.uint32)
    sig[rows] = np.where(filled[rows], sig[rows], np.minimum(moved, EMPTY - np.uint32(1)))
    return sig


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows), bands * rows <= num_perm, that minimise the weighted areas of false
    positives (similarity below the threshold, yet a band agrees) and false negatives."""
    s = np.linspace(0.0, 1.0, 401)
    below, above = s <= threshold, s >= threshold
    best, best_cost = (1, num_perm), np.inf
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - s**r) ** b
            cost = FP_WEIGHT * np.trapezoid(p[below], s[below]) + FN_WEIGHT * np.trapezoid(1 - p[above], s[above])
            if cost < best_cost:
                best, best_cost = (b, r), cost
    return best


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(bands, len(sig)) uint32 keys; two documents share a key where a whole band agrees (or,
    rarely, by chance: candidates are verified)."""
    keys = np.empty((bands, len(sig)), np.uint32)
    weights = _mix(np.arange(1, rows + 1, dtype=np.uint64))
    for b in range(bands):
        block = sig[:, b * rows : (b + 1) * rows].astype(np.uint64)
        keys[b] = (_mix((block * weights).sum(axis=1, dtype=np.uint64) + np.uint64(b)) >> np.uint64(32)).astype(
            np.uint32
        )
    return keys


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of signature rows: the share of equal slots."""
    return (a == b).mean(axis=-1)


@dataclass
class NearDuplicates:
    """Per partition, the positions dropped as near-duplicates; for each, the kept document of its
    cluster (partition, position) and the estimated similarity between the two."""

    drops: list[np.ndarray]
    kept: list[np.ndarray]
    similarity: list[np.ndarray]


def candidate_pairs(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(n, 2) distinct pairs (lower id first) of documents that share a band key: each one with
    the first and with the previous document of its bucket."""
    pairs = []
    for band in keys:
        order = np.argsort(band, kind="stable")
        k, d = band[order], ids[order]
        same = k[1:] == k[:-1]
        if not same.any():
            continue
        group_start = np.maximum.accumulate(np.where(np.concatenate(([False], same)), 0, np.arange(len(k))))
        pairs += [np.stack([d[:-1][same], d[1:][same]], 1), np.stack([d[group_start][1:][same], d[1:][same]], 1)]
    if not pairs:
        return np.empty((0, 2), np.int64)
    both = np.concatenate(pairs)
    both = both[both[:, 0] != both[:, 1]]
    return np.unique(np.sort(both, axis=1), axis=0)


def near_duplicates(
    counts: list[int], load: Callable[[int], np.ndarray], exclude: list[np.ndarray], cfg: NearDupConfig
) -> NearDuplicates:
    """Near-duplicates over partitions of `counts` documents; `load(p)` gives partition p's
    signatures and `exclude[p]` positions already dropped (exact duplicates)."""
    offsets = np.cumsum([0, *counts])
    bands, rows = lsh_params(cfg.threshold, cfg.num_perm)
    keys = np.empty((bands, offsets[-1]), np.uint32)
    eligible = np.zeros(offsets[-1], bool)
    for p, n in enumerate(counts):
        if n:
            sig = load(p)
            keys[:, offsets[p] : offsets[p + 1]] = band_keys(sig, bands, rows)
            eligible[offsets[p] : offsets[p + 1]] = sig[:, 0] != EMPTY
            eligible[offsets[p] + np.asarray(exclude[p], np.int64)] = False
    ids = np.flatnonzero(eligible)
    pairs = candidate_pairs(keys[:, ids], ids)
    del keys
    rows_of = _rows(pairs, offsets, load)
    sims = similarity(rows_of(pairs[:, 0]), rows_of(pairs[:, 1])) if len(pairs) else np.empty(0)
    root = _clusters(pairs[sims >= cfg.threshold])
    dropped = np.array(sorted(d for d, r in root.items() if d != r), np.int64)
    kept = np.array([root[d] for d in dropped], np.int64)
    sim = similarity(rows_of(dropped), rows_of(kept)) if len(dropped) else np.empty(0)
    part = np.searchsorted(offsets, dropped, side="right") - 1
    kept_part = np.searchsorted(offsets, kept, side="right") - 1
    out = NearDuplicates([], [], [])
    for p in range(len(counts)):
        mine = part == p
        out.drops.append(dropped[mine] - offsets[p])
        out.kept.append(np.stack([kept_part[mine], kept[mine] - offsets[kept_part[mine]]], 1))
        out.similarity.append(np.round(sim[mine], 4))
    return out


def _rows(pairs: np.ndarray, offsets: np.ndarray, load: Callable[[int], np.ndarray]):
    """A lookup of the signature rows of the documents in `pairs`, loading each partition once."""
    needed = np.unique(pairs)
    table: dict[int, np.ndarray] = {}
    part = np.searchsorted(offsets, needed, side="right") - 1
    for p in np.unique(part):
        sig = load(int(p))
        for doc in needed[part == p]:
            table[int(doc)] = sig[doc - offsets[p]]

    def rows_of(docs: np.ndarray) -> np.ndarray:
        return np.stack([table[int(d)] for d in docs])

    return rows_of


def _clusters(pairs: np.ndarray) -> dict[int, int]:
    """Union-find over the pairs: each document's cluster root, the lowest id in its cluster."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in list(parent)}
