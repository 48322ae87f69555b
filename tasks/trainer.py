"""The training loop: Arrow shards in, a trained GPT and its checkpoint out.

Reads top to bottom in numbered phases, as nanoGPT's train.py does. It imports no
orchestration or tracking library: metrics leave through the `tracker` it is given.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from model import GPT, GPTConfig
from tasks.atomic import atomic_path
from tasks.metrics import evaluate_rows
from tasks.shards import ShardSet


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class NullTracker:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass


@dataclass
class TrainResult:
    weights: Path
    gpt_config: dict
    steps: int
    tokens: int
    seconds: float
    final_loss: float


class BatchSampler:
    """Shuffled row indices, reshuffled each epoch by (seed, epoch); position is its state."""

    def __init__(self, n_rows: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.offset = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n_rows)

    def next(self) -> np.ndarray:
        span = self.batch_size * self.world
        if self.offset + span > self.n_rows:
            self.epoch, self.offset = self.epoch + 1, 0
        order = self._order()[self.offset : self.offset + span]
        self.offset += span
        return order[self.rank :: self.world]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def pick_device(requested: str) -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def train(
    manifest_path: Path,
    cfg,  # tokenmill.config.RunConfig
    out_dir: Path,
    tracker: Tracker = NullTracker(),
    on_step=None,
) -> TrainResult:
    t = cfg.train
    # 1. Device, precision and seeds.
    device = pick_device(t.device)
    torch.manual_seed(t.seed)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None

    # 2. Data: memory-mapped train rows and the separate val stream.
    manifest = json.loads(Path(manifest_path).read_text())
    train_rows = ShardSet.open(manifest_path, "train")
    val_rows = ShardSet.open(manifest_path, "val")
    sampler = BatchSampler(len(train_rows), t.batch_size, t.seed)

    # 3. Model, optimizer and schedule.
    gpt_config = GPTConfig(
        vocab_size=manifest["tokenizer"]["vocab_size"],
        block_size=manifest["row_len"] - 1,
        n_layer=cfg.model.n_layer,
        n_head=cfg.model.n_head,
        n_embd=cfg.model.n_embd,
        dropout=cfg.model.dropout,
    )
    model = GPT(gpt_config).to(device)
    optimizer = model.configure_optimizer(t.weight_decay, t.lr, (t.beta1, t.beta2), device.type)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.min_lr_ratio)
    )
    tokens_per_step = t.batch_size * t.grad_accum * gpt_config.block_size

    # 4. The loop.
    started = time.time()
    window_start, loss_value = time.time(), float("nan")
    for step in range(t.max_steps):
        loss_sum = 0.0
        for _ in range(t.grad_accum):
            batch = torch.from_numpy(train_rows.rows(sampler.next())).to(device, non_blocking=True)
            with autocast() if autocast else nullcontext():
                _, loss = model(batch[:, :-1], batch[:, 1:])
            (loss / t.grad_accum).backward()
            loss_sum += float(loss.detach())
        loss_value = loss_sum / t.grad_accum
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step}; lower train.lr or check the data")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()

        done = step + 1
        if done % t.log_interval == 0 or done == t.max_steps:
            elapsed = time.time() - window_start
            steps_in_window = t.log_interval if done % t.log_interval == 0 else done % t.log_interval
            metrics = {
                "train_loss": loss_value,
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm),
                "tokens_per_s": steps_in_window * tokens_per_step / max(elapsed, 1e-9),
            }
            tracker.log_metrics(metrics, step=done)
            window_start = time.time()
        if done % t.eval_interval == 0 and done != t.max_steps:
            val = evaluate_rows(model, val_rows, t.eval_batches * t.batch_size, t.batch_size, None, device, autocast)
            tracker.log_metrics({"val_loss_periodic": val["val_loss"]}, step=done)
        if on_step:
            on_step(done, loss_value)

    # 5. Save the weights atomically.
    weights = Path(out_dir) / "model.pt"
    with atomic_path(weights) as tmp:
        torch.save(model.state_dict(), tmp)
    return TrainResult(
        weights=weights,
        gpt_config=gpt_config.__dict__.copy(),
        steps=t.max_steps,
        tokens=t.max_steps * tokens_per_step,
        seconds=time.time() - started,
        final_loss=loss_value,
    )
