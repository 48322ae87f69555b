"""What each task trains on, seen by the one training loop in `tasks.train.trainer`.

A task's data gives the loop host tensors for a batch of row indices, turns them (once on
the device) into the model's inputs, so the loop only ever calls `net(*inputs)` and gets
`(logits, loss)`, builds its network, and scores the periodic val check.

- `lm`: packed token rows from a `ShardSet`; inputs (x, y), the row shifted by one.
- `classify`: documents from a `LabelledShardSet`; inputs (tokens, lengths, labels,
  class_weight), class weights from the train split's label counts when asked.

    data = open_task_data(manifest_path, manifest, cfg)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model import GPT, GPTClassifier, GPTConfig
from tasks.core.shards import LabelledShardSet, ShardSet
from tasks.core.spec import TASKS
from tasks.modeling.metrics import evaluate_labelled, evaluate_rows
from tokenmill.errors import TokenmillError


def manifest_task(manifest: dict) -> str:
    """The task a manifest's shards were built for; manifests from before tasks are `lm`."""
    return manifest.get("task", "lm")


def check_task(cfg_task: str, manifest: dict, manifest_path: Path) -> str:
    """The manifest's task, when the config asks for the same one."""
    task = manifest_task(manifest)
    if task not in TASKS:
        raise TokenmillError(f"{manifest_path} has unknown task {task!r}; rebuild the shards with this version")
    if cfg_task != task:
        raise TokenmillError(
            f"the config says task={cfg_task} but {manifest_path} holds {task} shards; "
            f"set task={task} or preprocess the corpus with task={cfg_task}"
        )
    return task


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse label frequency, scaled to mean 1 over the classes present (absent ones get 0)."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=n_classes).astype(np.float64)
    weights = np.zeros(n_classes)
    present = counts > 0
    weights[present] = 1.0 / counts[present]
    if present.any():
        weights[present] /= weights[present].mean()
    return weights


class LMData:
    """Next-token prediction on packed rows of `row_len` tokens."""

    task = "lm"
    head = None

    def __init__(self, manifest_path: Path, manifest: dict, cfg=None):
        self.train = ShardSet.open(manifest_path, "train")
        self.val = ShardSet.open(manifest_path, "val")
        self.block_size = manifest["row_len"] - 1

    def __len__(self) -> int:
        return len(self.train)

    def build(self, gpt_config: GPTConfig) -> torch.nn.Module:
        return GPT(gpt_config)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        return (torch.from_numpy(self.train.rows(indices)),)

    def inputs(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        rows = batch[0]
        return rows[:, :-1], rows[:, 1:]

    def evaluate(self, net, n_rows: int, batch_size: int, device, autocast) -> dict[str, float]:
        val = evaluate_rows(net, self.val, n_rows, batch_size, None, device, autocast)
        return {"val_loss_periodic": val["val_loss"]}


class ClassifyData:
    """Document classification on right-padded rows of `max_len` tokens."""

    task = "classify"

    def __init__(self, manifest_path: Path, manifest: dict, cfg):
        pooling, weighted = cfg.classify.pooling, cfg.classify.class_weights
        self.train = LabelledShardSet.open(manifest_path, "train")
        self.val = LabelledShardSet.open(manifest_path, "val")
        self.block_size = self.train.max_len
        self.labels = list(manifest["labels"])
        if len(self.labels) < 2:
            raise TokenmillError(f"{manifest_path} names {len(self.labels)} label(s); a classifier needs at least 2")
        self.head = {"labels": self.labels, "pooling": pooling, "n_classes": len(self.labels)}
        weights = class_weights(self.train.labels, len(self.labels)) if weighted else None
        self.class_weight = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
        self._on_device: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.train)

    def build(self, gpt_config: GPTConfig) -> torch.nn.Module:
        return GPTClassifier(gpt_config, len(self.labels), self.head["pooling"])

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(a) for a in self.train.rows(indices))

    def inputs(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, ...]:
        tokens, lengths, labels = batch
        return tokens, lengths, labels, self.weight_on(tokens.device)

    def weight_on(self, device: torch.device) -> torch.Tensor | None:
        if self.class_weight is None:
            return None
        if str(device) not in self._on_device:  # moved once, not every micro-step
            self._on_device[str(device)] = self.class_weight.to(device)
        return self._on_device[str(device)]

    def evaluate(self, net, n_rows: int, batch_size: int, device, autocast) -> dict[str, float]:
        if not len(self.val):  # nothing to score: no NaN in the run's metrics
            return {}
        val = evaluate_labelled(net, self.val, n_rows, batch_size, device, autocast)
        return {"val_loss_periodic": val["val_loss"], "val_accuracy_periodic": val["val_accuracy"]}


# The data class of each task (tasks.core.spec), by the task's name.
TASK_DATA = {"lm": LMData, "classify": ClassifyData}


def gpt_config_for(cfg, vocab_size: int, block_size: int, **shape_fields) -> GPTConfig:
    """The network a config trains (its model section, or `shape_fields` in place of its shapes)."""
    m = cfg.model
    fields = {"n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd, **shape_fields}
    return GPTConfig(
        vocab_size=vocab_size,
        block_size=block_size,
        dropout=m.dropout,
        mlp=m.mlp,
        qk_norm=m.qk_norm,
        tie_embeddings=m.tie_embeddings,
        zero_init_proj=m.zero_init_proj,
        logit_softcap=m.logit_softcap,
        **fields,
    )


def open_task_data(manifest_path: Path, manifest: dict, cfg) -> LMData | ClassifyData:
    """The data of the manifest's task; a config asking for another task is an error."""
    return TASK_DATA[check_task(cfg.task, manifest, manifest_path)](manifest_path, manifest, cfg)
