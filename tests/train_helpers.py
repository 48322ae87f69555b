"""Tiny synthetic token shards and configs that the training, checkpoint, classifier and
distributed tests share."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.core.atomic import sha256_file
from tasks.core.shards import write_shard
from tokenmill.config import resolve_config

VOCAB, ROW_LEN = 64, 17


def write_corpus(
    root: Path, n_train: int = 64, n_val: int = 16, seed: int = 0, tokenizer: bytes = b"synthetic"
) -> Path:
    """Arrow shards of a learnable sequence (start + stride * i, mod VOCAB) and their manifest."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def rows(n):
        start, stride = rng.integers(0, VOCAB, (n, 1)), rng.integers(1, 4, (n, 1))
        return ((start + stride * np.arange(ROW_LEN)) % VOCAB).astype(np.uint16)

    shards = []
    for split, n, parts in (("train", n_train, 2), ("val", n_val, 1)):
        for i, part in enumerate(np.array_split(rows(n), parts)):
            name = f"{split}-{i:05d}.arrow"
            write_shard(root / name, part, {"split": split})
            shards.append(
                {
                    "path": name,
                    "split": split,
                    "rows": len(part),
                    "tokens": int(part.size),
                    "sha256": sha256_file(root / name),
                }
            )
    (root / "tokenizer.model").write_bytes(tokenizer)
    manifest = {
        "format": "tokenmill.shards/v1",
        "row_len": ROW_LEN,
        "shards": shards,
        "tokenizer": {"path": "tokenizer.model", "sha256": sha256_file(root / "tokenizer.model"), "vocab_size": VOCAB},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root / "manifest.json"


# `tokenmill train` flags for a model small enough to train in a second.
TINY_TRAIN = ["--preset", "tiny", "--set", "model.n_embd=32", "--set", "train.batch_size=8", "--device", "cpu"]


def tiny_config(**train):
    base = {
        "max_steps": 8,
        "batch_size": 8,
        "lr": 1e-2,
        "warmup_steps": 2,
        "log_interval": 1,
        "eval_interval": 1000,
        "checkpoint_every": 0,
        "device": "cpu",
    }
    return resolve_config(
        "tiny", None, {"model": {"n_layer": 2, "n_head": 2, "n_embd": 32}, "train": {**base, **train}}
    )


class Recorder:
    def __init__(self):
        self.rows: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def series(self, name):
        return [m[name] for _, m in self.rows if name in m]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train fastest on one thread, and a busy 2-core machine punishes two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
