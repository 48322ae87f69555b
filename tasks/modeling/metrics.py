"""Metrics computed from real rows: a language model's loss, perplexity and bits per byte;
a classifier's loss, accuracy, macro-F1, per-class precision and recall.

Bits per byte divides the summed loss by the UTF-8 bytes the target tokens decode to, so
models with different tokenizers compare fairly on the same text. Classification metrics
are computed from predictions through one confusion matrix (rows: true label, columns:
predicted), so every number in a report agrees with the plotted matrix.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from tasks.core.shards import LabelledShardSet, ShardSet

LN2 = math.log(2.0)


@torch.no_grad()
def evaluate_rows(
    model: torch.nn.Module,
    rows: ShardSet,
    n_rows: int,
    batch_size: int,
    byte_lengths: np.ndarray | None,
    device: torch.device,
    autocast=None,
) -> dict[str, float]:
    """Loss over the first `n_rows` rows (a fixed, frozen set), summed per target token."""
    was_training = model.training
    model.eval()
    n_rows = min(n_rows, len(rows))
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    for start in range(0, n_rows, batch_size):
        batch = torch.from_numpy(rows.rows(np.arange(start, min(start + batch_size, n_rows))))
        x, y = batch[:, :-1].to(device), batch[:, 1:].to(device)
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            logits, _ = model(x, y)
        nats = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        total_nats += float(nats)
        total_tokens += y.numel()
        if byte_lengths is not None:
            total_bytes += int(byte_lengths[batch[:, 1:].numpy()].sum())
    model.train(was_training)
    loss = total_nats / max(1, total_tokens)
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": float(total_tokens)}
    if byte_lengths is not None:
        out["val_bpb"] = total_nats / LN2 / max(1, total_bytes)
        out["val_bytes"] = float(total_bytes)
    return out


def unigram_entropy(rows: ShardSet, n_rows: int, vocab_size: int) -> float:
    """Entropy in nats/token of the target tokens' own frequencies: the no-context baseline."""
    n_rows = min(n_rows, len(rows))
    targets = rows.rows(np.arange(n_rows))[:, 1:].reshape(-1)
    counts = np.bincount(targets, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------- classification


def spread_rows(total: int, n_rows: int) -> np.ndarray:
    """`n_rows` of `total` row indices, evenly spaced, in order (all of them when n_rows >= total).

    Labelled val rows lie in reading order, so whole classes sit together; the first n rows
    could miss most classes, while evenly spaced rows take each class in proportion.
    """
    if n_rows >= total:
        return np.arange(total)
    return np.arange(n_rows) * total // n_rows


@torch.no_grad()
def predict_labelled(
    model: torch.nn.Module,
    rows: LabelledShardSet,
    n_rows: int,
    batch_size: int,
    device: torch.device,
    autocast=None,
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 logits (n, n_classes), true labels (n,)) of `n_rows` documents spread evenly
    over the split (see `spread_rows`)."""
    was_training = model.training
    model.eval()
    chosen = spread_rows(len(rows), n_rows)
    logits, labels = [], []
    for start in range(0, len(chosen), batch_size):
        tokens, lengths, y = rows.rows(chosen[start : start + batch_size])
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            out, _ = model(torch.from_numpy(tokens).to(device), torch.from_numpy(lengths).to(device))
        logits.append(out.float().cpu().numpy())
        labels.append(y)
    model.train(was_training)
    if not logits:
        return np.empty((0, len(rows.label_names)), np.float32), np.empty(0, np.int64)
    return np.concatenate(logits), np.concatenate(labels)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy in nats of float logits (n, k) against labels (n,)."""
    if not len(labels):
        return float("nan")
    loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits).double(), torch.from_numpy(labels))
    return float(loss)


def evaluate_labelled(
    model, rows: LabelledShardSet, n_rows: int, batch_size: int, device, autocast=None
) -> dict[str, float]:
    """Loss and accuracy over `n_rows` documents spread over the split: the periodic check in training."""
    logits, labels = predict_labelled(model, rows, n_rows, batch_size, device, autocast)
    accuracy = float((logits.argmax(axis=1) == labels).mean()) if len(labels) else float("nan")
    return {"val_loss": cross_entropy(logits, labels), "val_accuracy": accuracy}


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts (n_classes, n_classes): row = true label, column = predicted label."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(actual, np.int64), np.asarray(predicted, np.int64)), 1)
    return matrix


def metric_names(labels: list[str]) -> list[str]:
    """Each label as a metric-name suffix: [A-Za-z0-9_.-] only, made unique by its id if needed."""
    names: list[str] = []
    for i, label in enumerate(labels):
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", label) or "_"
        names.append(f"{name}-{i}" if name in names else name)
    return names


def classification_metrics(matrix: np.ndarray, labels: list[str]) -> dict[str, float]:
    """accuracy, macro_f1 and precision.<label> / recall.<label> from a confusion matrix.

    A class that was never predicted has precision 0, one with no support recall 0. Macro-F1
    is the mean F1 over classes that occur in the labels or the predictions: a class absent
    from both says nothing about the model and is left out; one with support but no correct
    prediction counts with F1 = 0.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    support, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = (support > 0) | (predicted > 0)
    total = matrix.sum()
    out = {
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
    }
    for name, p, r in zip(metric_names(labels), precision, recall):
        out[f"precision.{name}"] = float(p)
        out[f"recall.{name}"] = float(r)
    return out
