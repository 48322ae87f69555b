"""A model on disk: its weights, tokenizer, shapes and (for a classifier) head.

What training produces, what evaluation scores and what the registry logs and downloads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tasks.core.shards import PAD_ID
from tasks.modeling.checkpoint import weights_sha256
from tokenmill.errors import TokenmillError


@dataclass(frozen=True)
class LocalModel:
    weights: Path
    tokenizer: Path
    gpt_config: dict
    tokenizer_sha256: str
    head: dict | None = None  # classify: {"labels": [...], "pooling": "mean"|"last"}; None for a language model


def from_manifest(weights: Path, gpt_config: dict, manifest_path: Path, head: dict | None = None) -> LocalModel:
    """The model just trained on a manifest: its tokenizer is the manifest's (and a classifier's
    `head` is what training returned in `TrainResult.head`)."""
    manifest = json.loads(Path(manifest_path).read_text())
    tokenizer = Path(manifest_path).parent / manifest["tokenizer"]["path"]
    return LocalModel(Path(weights), tokenizer, gpt_config, manifest["tokenizer"]["sha256"], head)


def logged_head(head: dict, manifest: dict) -> dict:
    """The head as the classifier pyfunc needs it: labels in id order, pooling, and how texts
    were cut, normalized and padded in training (the manifest's row length and normalization,
    the shards' pad id)."""
    labels = list(head.get("labels") or manifest.get("labels") or [])
    if not labels:
        raise TokenmillError("a classifier's head names no labels; train it on a classify manifest")
    return {
        **head,
        "labels": labels,
        "n_classes": len(labels),
        "max_len": int(manifest["row_len"]),
        "normalize": training_normalization(manifest),
        "pad_id": PAD_ID,
    }


def training_normalization(manifest: dict) -> str:
    """The Unicode normalization the shards' documents had before encoding (data.normalize)."""
    return manifest.get("config", {}).get("data", {}).get("normalize", "none")


def file_weights_sha256(weights: Path) -> str:
    """The sha256 a registered version is tagged with (`tasks.modeling.checkpoint.weights_sha256`)."""
    import torch

    return weights_sha256(torch.load(weights, map_location="cpu", weights_only=True))


def require_same_tokenizer(local: LocalModel, manifest: dict) -> None:
    """A model scores only shards encoded with its own tokenizer."""
    if local.tokenizer_sha256 != manifest["tokenizer"]["sha256"]:
        raise TokenmillError(
            f"the model's tokenizer ({local.tokenizer_sha256[:12]}) differs from the shards' "
            f"({manifest['tokenizer']['sha256'][:12]}); evaluate on shards built with the model's tokenizer"
        )
