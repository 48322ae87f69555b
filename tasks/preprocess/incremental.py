"""Reuse what earlier builds of a corpus already made: its tokenizer, document hashes and shards.

Every output directory keeps, beside its shards, the per-partition files that name their
own inputs by content key: `hashes/<source key>.npz` (its documents' hashes, for dedup) and
`parts/<encode key>.json` (a finished partition and its shards). A new build of the same
corpus (same name, any fingerprint) looks these up in its own directory first, which makes a
killed run resumable, then in earlier builds, newest first, and hard-links (or copies)
whatever matches. A reused shard is checked against its recorded sha256 before it counts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tasks.core.atomic import sha256_file, write_json, write_with
from tasks.core.shards import shard_name
from tasks.preprocess.encode import HASHES, PARTS, PartitionResult

MAX_EARLIER_BUILDS = 8
TOKENIZER_RECORD = "tokenizer.json"


def build_dirs(out: Path, corpus_name: str) -> list[Path]:
    """Where to look for reusable work: `out` itself, then earlier builds of the corpus, newest first."""
    siblings = [d for d in Path(out).parent.glob(f"{corpus_name}-*") if d.is_dir() and d != Path(out)]
    siblings.sort(key=lambda d: d.stat().st_mtime_ns, reverse=True)
    return [Path(out), *siblings[:MAX_EARLIER_BUILDS]]


def link_or_copy(src: Path, dest: Path) -> None:
    """`dest` becomes the same bytes as `src`, atomically: a hard link where possible, else a copy."""
    if dest.exists() and os.path.samefile(src, dest):
        return

    def place(tmp: Path) -> None:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    write_with(dest, place)


def find_hashes(dirs: list[Path], skey: str) -> Path | None:
    """A cached hash file for this source key, linked into `dirs[0]`."""
    for d in dirs:
        path = d / HASHES / f"{skey}.npz"
        if path.is_file():
            dest = dirs[0] / HASHES / path.name
            link_or_copy(path, dest)
            return dest
    return None


def find_partition(dirs: list[Path], key: str, index: int) -> PartitionResult | None:
    """A finished partition with this encode key, its shards linked into `dirs[0]` and verified."""
    for d in dirs:
        record = d / PARTS / f"{key}.json"
        if not record.is_file():
            continue
        try:
            result = PartitionResult.from_json(json.loads(record.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        reused = _relink(d, dirs[0], result, index)
        if reused is not None:
            write_json(dirs[0] / PARTS / record.name, reused.to_json())
            return reused
    return None


def _relink(src_dir: Path, out: Path, result: PartitionResult, index: int) -> PartitionResult | None:
    shards = []
    for shard in result.shards:
        src = src_dir / shard["path"]
        dest = out / shard_name(shard["split"], index)
        if not src.is_file():
            return None
        if src_dir != out or src != dest:
            link_or_copy(src, dest)
        if sha256_file(dest) != shard["sha256"]:
            dest.unlink()
            return None
        shards.append({**shard, "path": dest.name})
    return PartitionResult(index, result.key, shards, result.stats, result.first, reused=True, samples=result.samples)


def find_tokenizer(dirs: list[Path], key: str) -> tuple[Path, str] | None:
    """An earlier build's tokenizer trained with the same settings on the same kind of sample."""
    for d in dirs:
        record, model = d / TOKENIZER_RECORD, d / "tokenizer.model"
        try:
            meta = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("key") == key and model.is_file() and sha256_file(model) == meta.get("sha256"):
            return model, meta["sha256"]
    return None


def record_tokenizer(out: Path, key: str, sha256: str, origin: str) -> None:
    write_json(Path(out) / TOKENIZER_RECORD, {"key": key, "sha256": sha256, "origin": origin})
