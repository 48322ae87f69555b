"""What `tokenmill gc` keeps and removes: a pure decision on a listing of the state dir and
the registry's versions, then the removal, each item under its lock (tokenmill/locks.py).

Kept: every version holding an alias (champion, challenger, previous-champion or any other)
and the newest `keep_last` versions of each registered model, with their shard dir (the
`manifest` tag), their training dir (model.pt, model.json, run.json, eval-*) and the cache
records of kept files; the newest complete shard dir per corpus (and any unfinished build
newer than it), which the next incremental build reuses. MLflow itself (the registry and
its artifacts) is never touched. Removed: everything else under shards/ and models/ that is
older than `min_age_s`, checkpoints/ of finished runs, cache records whose files are gone,
and stale `.*.tmp` files. Anything locked at that moment is skipped as in use.

    from tasks.gc.collect import run_gc
    from tasks.registry.versions import registered_versions
    report = run_gc(state, registered_versions(), keep_last=3, dry_run=True)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tokenmill.locks import try_exclusive

CHECKPOINTS, WEIGHTS, MANIFEST, RECORDS = "checkpoints", "model.pt", "manifest.json", "cache"
MIN_AGE_S = 3600
_SHARD_KEY = re.compile(r"^(?P<corpus>.+)-[0-9a-f]{16}$")


@dataclass(frozen=True)
class Version:
    model: str
    version: int
    run_id: str = ""
    manifest: str = ""
    weights_sha256: str = ""
    aliases: tuple[str, ...] = ()
    created: float = 0.0

    def label(self) -> str:
        return f"{self.model} v{self.version}" + (f" ({', '.join(self.aliases)})" if self.aliases else "")


@dataclass(frozen=True)
class Entry:
    """A file or directory: its newest mtime, the bytes of files linked only here, and the
    (device, inode, size, links) of hard-linked files, which free space only with their last link."""

    path: str
    mtime: float
    size: int = 0
    shared: tuple[tuple[int, int, int, int], ...] = ()


@dataclass(frozen=True)
class ShardDir:
    entry: Entry
    complete: bool  # its manifest.json is written


@dataclass(frozen=True)
class RunDir:
    entry: Entry
    finished: bool  # model.pt is written
    checkpoints: Entry | None = None


@dataclass(frozen=True)
class Record:
    entry: Entry
    outputs: tuple[str, ...]
    missing: bool  # an output file is gone
    weights_sha256: str = ""


@dataclass(frozen=True)
class Tree:
    shards: list[ShardDir] = field(default_factory=list)
    runs: list[RunDir] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    temps: list[Entry] = field(default_factory=list)


@dataclass(frozen=True)
class Removal:
    entry: Entry
    kind: str  # shards, run, checkpoints, record, temp
    reason: str
    lock: str = ""  # what a process building or reading it holds; "" for none


@dataclass
class Plan:
    remove: list[Removal]
    kept_versions: list[str]
    kept_paths: dict[str, str]  # path -> why


def kept_versions(versions: list[Version], keep_last: int) -> list[Version]:
    """Versions with any alias, and the newest `keep_last` of each registered model."""
    newest: dict[str, list[int]] = {}
    for v in versions:
        newest.setdefault(v.model, []).append(v.version)
    last = {m: set(sorted(ns)[-keep_last:]) if keep_last > 0 else set() for m, ns in newest.items()}
    return sorted((v for v in versions if v.aliases or v.version in last[v.model]), key=lambda v: (v.model, v.version))


def corpus_of(shard_dir: str) -> str | None:
    """`python-stdlib` of `.../python-stdlib-<key>` (`stdlib-packages-cls` for labelled shards)."""
    m = _SHARD_KEY.match(Path(shard_dir).name)
    return m["corpus"] if m else None


def newest_builds(shards: list[ShardDir]) -> set[str]:
    """Per corpus, the newest complete build and any unfinished one newer than it."""
    groups: dict[str, list[ShardDir]] = {}
    for s in shards:
        groups.setdefault(corpus_of(s.entry.path) or s.entry.path, []).append(s)
    keep = set()
    for group in groups.values():
        done = [s.entry.mtime for s in group if s.complete]
        cutoff = max(done) if done else float("-inf")
        keep |= {s.entry.path for s in group if s.entry.mtime >= cutoff}
    return keep


def owner(path: str, dirs: set[str]) -> str | None:
    """The directory of `dirs` that holds `path`."""
    return next((str(p) for p in Path(path).parents if str(p) in dirs), None)


def decide(tree: Tree, versions: list[Version], keep_last: int, now: float, min_age_s: float = MIN_AGE_S) -> Plan:
    """What to remove, and what is kept and why. Nothing younger than `min_age_s` goes."""
    kept = kept_versions(versions, keep_last)
    why: dict[str, str] = {}
    for v in kept:
        if v.manifest:
            why.setdefault(str(Path(v.manifest).parent), f"shards of {v.label()}")
    for path in newest_builds(tree.shards):
        why.setdefault(path, "newest build of its corpus")
    run_paths = {r.entry.path for r in tree.runs}
    by_run = {v.run_id: v for v in kept}
    by_sha = {v.weights_sha256: v for v in kept if v.weights_sha256}
    for r in tree.runs:
        if (v := by_run.get(Path(r.entry.path).name)) is not None:
            why.setdefault(r.entry.path, f"weights of {v.label()}")
    for rec in tree.records:  # a run that reused cached training registers weights from another run's dir
        home = next((d for d in map(lambda o: owner(o, run_paths), rec.outputs) if d), None)
        if home and (v := by_sha.get(rec.weights_sha256)) is not None:
            why.setdefault(home, f"weights of {v.label()}")
    registered = {v.run_id for v in versions}
    newest_kept = max((v.created for v in kept), default=None)
    old = lambda e: e.mtime < now - min_age_s  # noqa: E731
    remove: list[Removal] = []
    for s in tree.shards:
        if s.entry.path not in why and old(s.entry):
            remove.append(Removal(s.entry, "shards", "no kept version uses it; not its corpus's newest", s.entry.path))
    for r in tree.runs:
        remove += run_removals(r, r.entry.path in why, Path(r.entry.path).name in registered, newest_kept, old)
    gone = {x.entry.path for x in remove}
    for rec in tree.records:
        lost = rec.missing or any(owner(o, gone) for o in rec.outputs)
        if lost:
            remove.append(Removal(rec.entry, "record", "its files are gone", rec.entry.path))
    for t in tree.temps:
        if old(t) and not owner(t.path, gone):
            home = owner(t.path, {s.entry.path for s in tree.shards} | run_paths) or ""
            remove.append(Removal(t, "temp", "stale temporary file", home))
    return Plan(remove, [v.label() for v in kept], why)


def run_removals(r: RunDir, kept: bool, registered: bool, newest_kept: float | None, old) -> list[Removal]:
    """A training dir goes when its run's versions are not kept, or, never registered, when it
    is older than the newest kept version (a failed or superseded run); a finished run that
    stays loses its checkpoints."""
    if not old(r.entry):
        return []
    if not kept and registered:
        return [Removal(r.entry, "run", "its versions are not kept", r.entry.path)]
    if not kept and newest_kept is not None and r.entry.mtime < newest_kept:
        return [Removal(r.entry, "run", "not registered; older than the newest kept version", r.entry.path)]
    if r.finished and r.checkpoints is not None:
        return [Removal(r.checkpoints, "checkpoints", "the run finished", r.entry.path)]
    return []


def freed_bytes(entries: list[Entry]) -> list[int]:
    """Bytes each removal frees: its own files, and a hard-linked file with its last link."""
    links = Counter((dev, ino) for e in entries for dev, ino, _, _ in e.shared)
    counted: set[tuple[int, int]] = set()
    out = []
    for e in entries:
        size = e.size
        for dev, ino, nbytes, nlink in e.shared:
            if links[(dev, ino)] >= nlink and (dev, ino) not in counted:
                counted.add((dev, ino))
                size += nbytes
        out.append(size)
    return out


# Reading the state dir.


def entry_of(path: Path) -> Entry:
    """Sizes and newest mtime of a file, or of everything under a directory (links not followed)."""
    stats = [path.lstat()]
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            stats += [os.lstat(os.path.join(root, name)) for name in files + dirs]
    size, shared = 0, []
    for st in stats:
        if not stat.S_ISREG(st.st_mode):
            continue
        if st.st_nlink > 1:
            shared.append((st.st_dev, st.st_ino, st.st_size, st.st_nlink))
        else:
            size += st.st_size
    return Entry(str(path), max(st.st_mtime for st in stats), size, tuple(shared))


def read_record(path: Path) -> Record:
    try:
        data = json.loads(path.read_text())
        outputs = tuple(data.get("outputs") or {})
        value = data.get("value") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return Record(entry_of(path), (), True)
    sha = value.get("weights_sha256") or (value.get("result") or {}).get("weights_sha256") or ""
    return Record(entry_of(path), outputs, not all(Path(o).is_file() for o in outputs), sha)


def scan(state: Path) -> Tree:
    """The shard dirs, training dirs, cache records and temp files under `state`."""
    shards_root, models_root = state / "shards", state / "models"
    shard_dirs = sorted(d for d in shards_root.glob("*") if d.is_dir()) if shards_root.is_dir() else []
    run_dirs = (
        sorted(d for d in models_root.glob("*") if d.is_dir() and d.name != RECORDS) if models_root.is_dir() else []
    )
    temps = [p for root in (shards_root, models_root) if root.is_dir() for p in root.rglob(".*.tmp") if p.is_file()]
    return Tree(
        shards=[ShardDir(entry_of(d), (d / MANIFEST).is_file()) for d in shard_dirs],
        runs=[
            RunDir(
                entry_of(d), (d / WEIGHTS).is_file(), entry_of(d / CHECKPOINTS) if (d / CHECKPOINTS).is_dir() else None
            )
            for d in run_dirs
        ],
        records=[read_record(p) for p in sorted((models_root / RECORDS).glob("*.json"))],
        temps=[entry_of(p) for p in sorted(temps)],
    )


# Removing.


@dataclass
class Report:
    removed: list[dict]
    in_use: list[dict]
    kept: dict
    bytes: int
    dry_run: bool

    def as_json(self) -> dict:
        return {
            "removed": self.removed,
            "bytes": self.bytes,
            "kept": self.kept,
            "in_use": self.in_use,
            "dry_run": self.dry_run,
        }


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def carry_out(plan: Plan, dry_run: bool) -> Report:
    """Remove what the plan says (nothing with `dry_run`), each under its lock taken without
    waiting; what a process builds or reads now is listed as in use instead."""
    done, busy = [], []
    for item in plan.remove:
        with try_exclusive(item.lock or item.entry.path) as free:
            if not free:
                busy.append({"path": item.entry.path, "kind": item.kind})
                continue
            if not dry_run:
                remove(Path(item.entry.path))
            done.append(item)
    sizes = freed_bytes([d.entry for d in done])
    removed = [{"path": d.entry.path, "kind": d.kind, "reason": d.reason, "bytes": n} for d, n in zip(done, sizes)]
    kept = {"versions": plan.kept_versions, "paths": dict(sorted(plan.kept_paths.items()))}
    return Report(removed, busy, kept, sum(sizes), dry_run)


def run_gc(
    state: Path, versions: list[dict], keep_last: int = 3, dry_run: bool = False, min_age_s: float = MIN_AGE_S
) -> Report:
    """`versions` is every registered version (`tasks.registry.versions.registered_versions`)."""
    kept = [Version(**{**v, "aliases": tuple(v["aliases"])}) for v in versions]
    plan = decide(scan(state), kept, keep_last, time.time(), min_age_s)
    return carry_out(plan, dry_run)


@task(name="gc", cache_policy=NO_CACHE)
def collect_garbage(
    versions: list[dict], keep_last: int = 3, dry_run: bool = False, min_age_s: float = MIN_AGE_S
) -> dict:
    """Remove what no kept version, corpus or running process needs from the state dir."""
    from tokenmill.runtime import state_dir

    return run_gc(state_dir(), versions, keep_last, dry_run, min_age_s).as_json()
