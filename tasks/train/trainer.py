"""The training loop: Arrow shards in; a trained GPT, its checkpoints and its metrics out.

One engine for every task: the manifest's `task` picks the data (`tasks.modeling.task_data`),
which supplies each batch as a tuple of tensors and builds the network, a language model
or a classifier; the loop calls `net(*inputs) -> (logits, loss)` and shares everything
else (precision, accumulation, ranks, checkpoints, exact resume, guards, eval, MFU).

Reads top to bottom in numbered phases, as nanoGPT's train.py does. Scale (compile, DDP,
FSDP2) is applied from outside by `tasks.modeling.parallel`, and checkpoints are `tasks.modeling.checkpoint`'s.
It imports no orchestration or tracking library: metrics leave through the `tracker` it is
given, from rank 0 only.

    result = train(manifest_path, cfg, out_dir, resume=True)   # one process, any device

Several ranks run this same function under torchrun; `tasks.train.launch` starts them.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from tasks.core.atomic import atomic_path
from tasks.modeling import checkpoint, parallel
from tasks.modeling.checkpoint import WarmStart
from tasks.modeling.task_data import gpt_config_for, manifest_task, open_task_data
from tokenmill.errors import TokenmillError

CHECKPOINTS = "checkpoints"
WEIGHTS = "model.pt"


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_params(self, params: dict[str, str]) -> None: ...


class NullTracker:
    run_id = None  # no tracking run

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_params(self, params: dict[str, str]) -> None:
        pass


OnStep = Callable[[int, float, float], None]  # (steps done, loss, tokens/s so far)


@dataclass
class TrainResult:
    weights: Path
    gpt_config: dict
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    weights_sha256: str = ""
    checkpoint: Path | None = None
    tokens_per_second: float = 0.0  # of this invocation's training loop
    resumed_from: int | None = None  # the checkpoint step it continued from
    head: dict | None = None  # classify: {"labels", "pooling", "n_classes"}; None for a language model


class BatchSampler:
    """Shuffled row indices, reshuffled each epoch by (seed, epoch); position is its state.

    Each optimizer micro-step takes the next `batch_size * world` rows of the epoch's
    order, and rank r keeps every world-th of them: ranks read disjoint parts of one
    global batch, and (epoch, offset) is the same on every rank.
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.offset = 0, 0
        self._cached: tuple[int, np.ndarray] | None = None

    def _order(self) -> np.ndarray:
        if self._cached is None or self._cached[0] != self.epoch:  # one permutation per epoch
            self._cached = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(self.n_rows))
        return self._cached[1]

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
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def lr_factor(
    step: int, warmup: int, total: int, min_ratio: float, schedule: str = "cosine", decay_fraction: float = 0.4
) -> float:
    """The LR multiplier at `step` (0-based) of `total`: linear warmup to 1, then

    cosine: cosine decay to `min_ratio` at `total` steps;
    wsd (warmup-stable-decay): 1 until the last `decay_fraction` of the steps, then linear
    down towards `min_ratio`. Holding the peak LR for longer and annealing at the end beats
    cosine at equal steps (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
    Beyond Fixed Training Durations"; nanochat and modded-nanogpt train this way).
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * total))
        progress = max(0.0, (step - (total - decay_steps)) / decay_steps)
        return 1 - (1 - min_ratio) * min(1.0, progress)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# Dense bf16 tensor-core peaks per device (datasheets, no sparsity), FLOP/s. The first
# substring found in torch.cuda.get_device_name() wins, so specific names come first.
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.5e12),
    ("H200", 989.5e12),
    ("H800", 989.5e12),
    ("GH200", 989.5e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 6000 Ada", 364e12),
    ("A6000", 155e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]


def peak_flops(device: torch.device, override: float | None) -> float | None:
    """The device's bf16 peak for MFU: the configured one, else the table's (GPUs only)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def autocast_for(device: torch.device, precision: str):
    """A context factory for bf16 autocast (auto: on CUDA only), or None for fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return None


def make_optimizer(model: torch.nn.Module, t, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer that `t` (a TrainConfig) asks for: Muon with AdamW, or AdamW alone."""
    return model.configure_optimizer(
        t.weight_decay,
        t.lr,
        (t.beta1, t.beta2),
        device.type,
        optimizer=t.optimizer,
        muon_lr=t.muon_lr,
        muon_momentum=t.muon_momentum,
    )


def accumulation_steps(t, block_size: int, world: int) -> int:
    """Micro-steps per optimizer step: train.grad_accum, or derived from train.tokens_per_step."""
    if t.tokens_per_step is None:
        return t.grad_accum
    per_micro = t.batch_size * block_size * world
    if t.tokens_per_step % per_micro:
        fits = max(1, round(t.tokens_per_step / per_micro)) * per_micro
        raise TokenmillError(
            f"train.tokens_per_step={t.tokens_per_step} is not a multiple of batch_size x context x ranks "
            f"= {t.batch_size} x {block_size} x {world} = {per_micro}; use e.g. {fits}"
        )
    return t.tokens_per_step // per_micro


def data_sha256(manifest: dict) -> str:
    """Identifies the training rows a checkpoint was trained on (and, to classify, their label names)."""
    train = [(s["path"], s.get("sha256"), s["rows"]) for s in manifest["shards"] if s["split"] == "train"]
    key = [manifest["row_len"], train]
    if manifest_task(manifest) != "lm":
        key += [manifest_task(manifest), manifest.get("labels")]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def train(
    manifest_path: Path,
    cfg,  # tokenmill.config.RunConfig (or anything shaped like it)
    out_dir: Path,
    tracker: Tracker | None = None,
    on_step: OnStep | None = None,
    *,
    resume: bool = False,
    warm: WarmStart | None = None,
) -> TrainResult:
    """Train on the manifest's train split; checkpoints go to out_dir/checkpoints, weights to
    out_dir/model.pt. With `resume`, continue from the last good checkpoint there."""
    t, started = cfg.train, time.time()
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / CHECKPOINTS

    # 1. Ranks, device and precision. torchrun's environment says which rank this is.
    ranks = parallel.ranks_from_env()
    device = parallel.rank_device(parallel.pick_device(t.device), ranks)
    parallel.join_process_group(ranks, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # for whatever autocast leaves in fp32
        torch.backends.cudnn.allow_tf32 = True
    autocast = autocast_for(device, t.precision)
    tracker = tracker or NullTracker()
    if not ranks.main:
        tracker, on_step = NullTracker(), None

    # 2. Data of the manifest's task: memory-mapped train rows, a sampler per rank, the val
    #    stream. The context is the row minus one (lm) or the padded document length (classify).
    manifest = json.loads(Path(manifest_path).read_text())
    tokenizer_sha = manifest["tokenizer"]["sha256"]
    data = open_task_data(manifest_path, manifest, cfg)
    if len(data) < t.batch_size * ranks.world:
        raise TokenmillError(
            f"the train split has {len(data)} rows, fewer than one batch across ranks "
            f"({t.batch_size} x {ranks.world}); lower train.batch_size"
        )
    sampler = BatchSampler(len(data), t.batch_size, t.seed, ranks.rank, ranks.world)
    gpt_config = gpt_config_for(cfg, manifest["tokenizer"]["vocab_size"], data.block_size)
    accum = accumulation_steps(t, gpt_config.block_size, ranks.world)
    tokens_per_step = t.batch_size * gpt_config.block_size * accum * ranks.world

    # 3. Where to start: the newest checkpoint that loads, when resuming; step 0 otherwise.
    last_saved, payload = checkpoint.load_latest(ckpt_dir) or (None, None)
    if payload is not None and not resume:
        raise TokenmillError(
            f"{out_dir} already holds checkpoints of a run (up to {last_saved.name}); "
            f"resume it (--resume) or choose a new out dir"
        )
    if payload is not None:
        checkpoint.check_compatible(payload, gpt_config.__dict__, data_sha256(manifest), last_saved, data.head)
    if ranks.main:
        checkpoint.write_run_record(
            out_dir,
            config=cfg.model_dump(),
            manifest=str(Path(manifest_path).resolve()),
            data_sha256=data_sha256(manifest),
            tokenizer_sha256=tokenizer_sha,
            gpt_config=gpt_config.__dict__.copy(),
            ranks=ranks.world,
            grad_accum=accum,
            tokens_per_step=tokens_per_step,
            device=str(device),
            resumed_from=payload["step"] if payload is not None else None,
            warm_start=str(warm.weights) if warm else None,
            task=data.task,
            head=data.head,
        )

    # 4. Model (fresh, warm-started or restored), parallelized; optimizer and schedule.
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = data.build(gpt_config)
    if warm is not None and payload is None:
        loaded = checkpoint.warm_start(model, warm, tokenizer_sha, data.head)
        if ranks.main and data.head is not None:  # what a classifier took from its source
            from tokenmill.console import step  # here: a bare GPU box can run the trainer without rich

            step(loaded)
    model.to(device)
    flops_per_token, peak = model.flops_per_token(), peak_flops(device, t.peak_flops)
    net = parallel.parallelize(model, device=device, ranks=ranks, mode=t.parallel, compile=t.compile)
    optimizer = make_optimizer(model, t, device)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.min_lr_ratio, t.schedule, t.decay_fraction),
    )
    start_step, loss_value, resumed_from = 0, float("nan"), None
    if payload is not None:
        checkpoint.restore(payload, net, optimizer, schedule, sampler, ranks.rank, ranks.world, device)
        start_step = resumed_from = payload["step"]
        loss_value, payload = payload["loss"], None
    else:
        torch.manual_seed(t.seed + ranks.rank)  # dropout differs across ranks

    def snapshot(step: int) -> dict | None:
        """The checkpoint payload on rank 0 (None elsewhere); every rank must call it."""
        state = checkpoint.model_state(net)
        optim = checkpoint.optimizer_state(net, optimizer)
        rng = checkpoint.gather_rng(device, ranks.world)
        if not ranks.main:
            return None
        return {
            "format": checkpoint.FORMAT,
            "step": step,
            "loss": loss_value,
            "model": state,
            "optimizer": optim,
            "scheduler": schedule.state_dict(),
            "sampler": sampler.state_dict(),
            "rng": rng,
            "config": cfg.model_dump(),
            "gpt_config": gpt_config.__dict__.copy(),
            "data_sha256": data_sha256(manifest),
            "world": ranks.world,
            "head": data.head,
        }

    # 5. The loop: accumulate micro-batches, guard, clip, step; log, eval and checkpoint.
    final_state = None
    loop_start = window_start = time.perf_counter()
    window_step, side_seconds = start_step, 0.0
    for step in range(start_step, t.max_steps):
        done = step + 1
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            batch = data.batch(sampler.next())
            if device.type == "cuda":
                batch = tuple(b.pin_memory().to(device, non_blocking=True) for b in batch)
            with parallel.grad_sync(net, micro == accum - 1):
                with autocast() if autocast else nullcontext():
                    _, loss = net(*data.inputs(batch))
                (loss / accum).backward()
            loss_sum += loss.detach()
        grad_norm = parallel.clip_grad_norm(net, t.grad_clip)
        # One host sync per step: the loss and norm averaged over ranks, so all stop together.
        loss_value, norm_value = parallel.mean_across_ranks(torch.stack([loss_sum / accum, grad_norm]), ranks).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            kept = f"the last good checkpoint {last_saved} is kept" if last_saved else "no checkpoint was written yet"
            raise TokenmillError(
                f"non-finite loss {loss_value} (grad norm {norm_value}) at step {done}; stopped before the "
                f"update and {kept}; lower train.lr or check the data"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()

        if ranks.main and (done % t.log_interval == 0 or done == t.max_steps):
            now = time.perf_counter()
            tokens_per_s = (done - window_step) * tokens_per_step / max(now - window_start, 1e-9)
            metrics = {
                "train_loss": loss_value,
                "lr": schedule.get_last_lr()[0],
                "grad_norm": norm_value,
                "tokens_per_s": tokens_per_s,
            }
            if peak:
                metrics["mfu"] = flops_per_token * tokens_per_s / (peak * ranks.world)
            tracker.log_metrics(metrics, step=done)
            window_start, window_step = now, done
        side_start = time.perf_counter()  # eval and checkpoints are timed apart from training
        if done % t.eval_interval == 0 and done != t.max_steps:
            val = data.evaluate(net, t.eval_batches * t.batch_size, t.batch_size, device, autocast)
            if val:
                tracker.log_metrics(val, step=done)
        if done == t.max_steps or (t.checkpoint_every and done % t.checkpoint_every == 0):
            payload = snapshot(done)
            if payload is not None:
                last_saved = checkpoint.save(ckpt_dir, payload, t.keep_checkpoints)
                final_state = payload["model"] if done == t.max_steps else None
            payload = None
        spent = time.perf_counter() - side_start
        side_seconds, window_start = side_seconds + spent, window_start + spent
        if on_step:
            elapsed = time.perf_counter() - loop_start - side_seconds
            on_step(done, loss_value, (done - start_step) * tokens_per_step / max(elapsed, 1e-9))
    loop_seconds = time.perf_counter() - loop_start - side_seconds

    # 6. The final weights (a plain state_dict) and the model card beside them, on rank 0.
    final_step = max(start_step, t.max_steps)
    # The last step's snapshot holds the weights; a run resumed at its end takes them now.
    state = final_state if t.max_steps > start_step else checkpoint.model_state(net)
    weights = out_dir / WEIGHTS
    sha = checkpoint.weights_sha256(state) if ranks.main else ""
    if ranks.main:
        with atomic_path(weights) as tmp:
            torch.save(state, tmp)
        checkpoint.write_model_card(
            out_dir,
            gpt_config.__dict__.copy(),
            tokenizer_sha,
            weights_sha256=sha,
            steps=final_step,
            data_sha256=data_sha256(manifest),
            config=cfg.model_dump(),
            task=data.task,
            head=data.head,
        )
    trained = final_step - start_step
    return TrainResult(
        weights=weights,
        gpt_config=gpt_config.__dict__.copy(),
        steps=final_step,
        tokens=final_step * tokens_per_step,
        seconds=time.time() - started,
        final_loss=loss_value,
        weights_sha256=sha,
        checkpoint=last_saved,
        tokens_per_second=trained * tokens_per_step / loop_seconds if trained else 0.0,
        resumed_from=resumed_from,
        head=data.head,
    )
