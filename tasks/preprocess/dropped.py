"""The record of what preprocessing dropped, and why: documents and bytes per reason for the
manifest and the summary, and a bounded, seeded sample of each reason's documents in
`<shards dir>/dropped/<reason>.jsonl` (one JSON object a line: where the document lies, its
bytes, an excerpt, and for a duplicate or near-duplicate the kept document it repeats).

Reasons: `duplicate` (exact), `near_duplicate`, and each quality filter by name
(tokenmill/data_quality.py). Documents a filter drops are sampled on the workers as they are
read (screen.py); repeats are decided on the client over the whole corpus (`decide`), so their
sample is chosen there, by the same seeded rank, and their text read back from the partitions.
Show a few with `tokenmill preprocess CORPUS --explain-drop N`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.core.atomic import write_bytes
from tasks.preprocess import near_dup
from tasks.preprocess.documents import DocRules, Tally, read_placed
from tasks.preprocess.encode import find_duplicates
from tasks.preprocess.partitions import Partition
from tasks.preprocess.screen import Screen, Screening, excerpt, merge_samples, priority
from tokenmill.data_quality import FILTERS

DROPPED = "dropped"
REASONS = ("duplicate", "near_duplicate", *FILTERS)


@dataclass
class Decision:
    """Per partition, every position dedup drops (sorted) and which of them are near-duplicates."""

    drops: list[np.ndarray]
    near: list[np.ndarray]
    found: near_dup.NearDuplicates | None = None


def decide(hashes: list[np.ndarray], load: Callable[[int], np.ndarray], screen: Screen | None) -> Decision:
    """Exact duplicates (the first occurrence wins), then, among what is left, near-duplicates
    (the first of each cluster wins) when the screen asks for them."""
    exact = find_duplicates(hashes)
    if screen is None or not screen.near_dup.enabled:
        return Decision(exact, [np.empty(0, np.int64) for _ in hashes])
    found = near_dup.near_duplicates([len(h) for h in hashes], load, exact, screen.near_dup)
    drops = [np.union1d(e, n).astype(np.int64) for e, n in zip(exact, found.drops)]
    return Decision(drops, found.drops, found)


def counts(stats: dict) -> dict[str, dict[str, int]]:
    """{reason: {"docs", "bytes"}} of every reason that dropped something."""
    return {
        r: {"docs": int(stats[f"dropped_{r}"]), "bytes": int(stats.get(f"bytes_dropped_{r}", 0))}
        for r in REASONS
        if stats.get(f"dropped_{r}")
    }


def pick_repeats(hashes: list[np.ndarray], decision: Decision, seed: int, k: int) -> list[dict]:
    """The sampled duplicates and near-duplicates: each with its partition and position, and the
    kept document's (partition, position)."""
    offsets = np.cumsum([0, *[len(h) for h in hashes]])
    flat = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
    picks = []
    for reason in ("duplicate", "near_duplicate"):
        found = []
        for p, (drops, near) in enumerate(zip(decision.drops, decision.near)):
            mine = near if reason == "near_duplicate" else np.setdiff1d(drops, near)
            found += [(priority(int(hashes[p][i]), seed), p, int(i)) for i in mine]
        for rank, p, i in sorted(found)[:k]:
            pick = {"reason": reason, "at": (p, i), "priority": rank}
            if reason == "duplicate":
                g = int(np.flatnonzero(flat == hashes[p][i])[0])  # the first occurrence is kept
                kp = int(np.searchsorted(offsets, g, side="right") - 1)
                pick["kept"] = (kp, g - int(offsets[kp]))
            else:
                j = int(np.searchsorted(decision.found.drops[p], i))
                pick["kept"] = tuple(int(x) for x in decision.found.kept[p][j])
                pick["similarity"] = float(decision.found.similarity[p][j])
            picks.append(pick)
    return picks


def read_at(part: Partition, positions: list[int], rules: DocRules, screen: Screen | None) -> dict[int, dict]:
    """The documents at `positions` (in the order hashes count them: read, then past the
    filters) of a partition: where each lies, its bytes and an excerpt. Runs on a worker."""
    wanted, found, position = set(positions), {}, -1
    screening = Screening(screen, signatures=False)
    for piece in part.pieces:
        for doc, where in read_placed(piece, rules, Tally()):
            if screening.rejects(doc, where):
                continue
            position += 1
            if position in wanted:
                found[position] = {"where": where, "bytes": len(doc.encode("utf-8")), "text": excerpt(doc)}
                if len(found) == len(wanted):
                    return found
    return found


def repeat_samples(connect, parts: list[Partition], picks: list[dict], rules: DocRules, screen) -> list[dict]:
    """The picked repeats as sample entries, their text (and their kept documents') read back on
    the Dask workers, each partition once."""
    if not picks:
        return []
    wanted: dict[int, set[int]] = {}
    for pick in picks:
        for p, i in (pick["at"], pick["kept"]):
            wanted.setdefault(p, set()).add(i)
    client = connect()
    futures = {p: client.submit(read_at, parts[p], sorted(ii), rules, screen, pure=False) for p, ii in wanted.items()}
    texts = {p: f.result() for p, f in futures.items()}
    entries = []
    for pick in picks:
        (p, i), (kp, ki) = pick["at"], pick["kept"]
        entry = {"reason": pick["reason"], **texts[p][i], "priority": pick["priority"]}
        entry["kept"] = {"where": texts[kp][ki]["where"], "text": texts[kp][ki]["text"]}
        if "similarity" in pick:
            entry["similarity"] = pick["similarity"]
        entries.append(entry)
    return entries


def write_samples(out: Path, samples: dict[str, list[dict]]) -> dict[str, str]:
    """`dropped/<reason>.jsonl` for each reason, atomically; files of reasons no longer dropped
    are removed. Returns {reason: path relative to `out`}."""
    folder = Path(out) / DROPPED
    written = {}
    for reason, entries in sorted(samples.items()):
        if not entries:
            continue
        lines = [json.dumps({k: v for k, v in e.items() if k != "priority"}, ensure_ascii=False) for e in entries]
        write_bytes(folder / f"{reason}.jsonl", ("\n".join(lines) + "\n").encode("utf-8"))
        written[reason] = f"{DROPPED}/{reason}.jsonl"
    for stale in folder.glob("*.jsonl") if folder.is_dir() else []:
        if stale.stem not in written:
            stale.unlink()
    return written


def record(out: Path, stats: dict, samples: list[dict[str, list[dict]]], k: int) -> dict[str, dict]:
    """The manifest's `dropped` entry: per reason, documents, bytes and the sample's file (written
    here, from every partition's and the client's samples, the `k` lowest ranked per reason)."""
    files = write_samples(out, merge_samples(samples, k))
    return {reason: {**n, "sample": files.get(reason)} for reason, n in counts(stats).items()}


def explain(out: Path, n: int) -> list[str]:
    """Up to `n` sampled documents of each reason, as lines for a terminal."""
    lines = []
    for path in sorted((Path(out) / DROPPED).glob("*.jsonl")):
        entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        lines.append(f"{path.stem}: {len(entries)} sampled in {path}")
        for e in entries[:n]:
            similar = f", similarity {e['similarity']:.2f}" if "similarity" in e else ""
            lines.append(f"  {e['where']} ({e['bytes']:,} bytes{similar})")
            lines.append(f"    {_one_line(e['text'])}")
            if "kept" in e:
                lines.append(f"    repeats {e['kept']['where']}: {_one_line(e['kept']['text'])}")
    return lines


def _one_line(text: str, width: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
