"""Content-addressed, verified caching of the training and evaluation stages.

A stage's record is named by a hash of everything that determines its output and lists the
files it produced with their sha256. A record is reused only while every file still matches,
so a deleted or corrupted output is recomputed, never trusted. Preprocessing has the same
guarantee through its content-addressed shard directory and verified manifest.

Prefect's own result cache is not used for these outputs: a hit there returns the stored
result without checking that the files behind it still exist and match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.core.atomic import sha256_file, write_json
from tasks.core.manifest import content_key
from tasks.core.provenance import code_version
from tasks.core.spec import task_spec

RECORDS = "cache"


def train_key(manifest_path: Path, cfg, init_from: Path | None) -> str:
    """Training output is determined by the shards, the model and training config (and a
    classifier's head settings), the starting weights and the code."""
    train = cfg.train.model_dump(exclude={"log_interval", "nproc_per_node"})
    init = sha256_file(init_from) if init_from else None
    parts = [sha256_file(manifest_path), cfg.model.model_dump(), train, init, code_version()]
    if task_spec(cfg.task).labelled:  # a language model's key stays what it was
        parts.append(cfg.classify.model_dump())
    return content_key("train", *parts)


def eval_key(weights_sha256: str, eval_set_sha256: str, eval_cfg) -> str:
    return content_key("eval", weights_sha256, eval_set_sha256, eval_cfg.model_dump(), code_version())


def record_path(root: Path, key: str) -> Path:
    return Path(root) / RECORDS / f"{key[:32]}.json"


def store(root: Path, key: str, outputs: list[Path], value: dict[str, Any]) -> Path:
    """Write the record last, after every output it names is complete."""
    path = record_path(root, key)
    write_json(path, {"key": key, "outputs": {str(p): sha256_file(p) for p in outputs}, "value": value})
    return path


def lookup(root: Path, key: str) -> dict[str, Any] | None:
    """The stored value when the record exists and all its outputs still match."""
    path = record_path(root, key)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("key") != key:
        return None
    for file, sha in record["outputs"].items():
        if not Path(file).is_file() or sha256_file(Path(file)) != sha:
            return None
    return record["value"]
