"""The shard manifest: what a preprocessing run produced, written last, verified on reuse."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from tasks.core.atomic import sha256_file

MANIFEST = "manifest.json"
FORMAT = "tokenmill.shards/v1"


def content_key(*parts: Any) -> str:
    """A stable hash of JSON-serializable parts: the name of a content-addressed output."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def verify(manifest_path: Path) -> dict | None:
    """The manifest when it and every file it names are present and match their sha256."""
    path = Path(manifest_path)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if manifest.get("format") != FORMAT:
        return None
    files = [(s["path"], s["sha256"]) for s in manifest["shards"]]
    files.append((manifest["tokenizer"]["path"], manifest["tokenizer"]["sha256"]))
    for rel, sha in files:
        f = path.parent / rel
        if not f.is_file() or sha256_file(f) != sha:
            return None
    return manifest


def reuse_or_clear(out: Path, refresh: bool) -> Path | None:
    """The verified manifest in `out`, to reuse as it is; with `refresh`, the earlier build is
    removed instead and None returned, as it is when nothing there verifies."""
    if refresh:
        shutil.rmtree(out, ignore_errors=True)
        return None
    return Path(out) / MANIFEST if verify(Path(out) / MANIFEST) else None


def eval_set_sha(manifest: dict, max_rows: int) -> str:
    """Identifies the frozen eval set: the val shards' content plus how many rows are used."""
    shas = [s["sha256"] for s in manifest["shards"] if s["split"] == "val"]
    return content_key(shas, max_rows)
