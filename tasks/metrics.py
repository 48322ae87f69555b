"""Language-model metrics computed from real rows: loss, perplexity, bits per byte.

Bits per byte divides the summed loss by the UTF-8 bytes the target tokens decode to, so
models with different tokenizers compare fairly on the same text.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tasks.shards import ShardSet

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
