"""The compute-budget dial: `train.budget_s` seconds of training become shapes, learning rates
and a step count chosen for the hardware at hand (`tokenmill run CORPUS --budget 10m`).

1. Probe. A few real training steps (the run's data, batch, optimizer and device) of two
   shapes from the ladder below measure seconds per step; a line through the two,
   seconds per token = a + b x FLOPs per token, predicts every other shape. The shape
   finally chosen is probed too, so its step count comes from its own measured speed.
2. Shape. The ladder is one dial, depth: n_layer = d, n_embd = 32 d, heads of 32 (the
   aspect ratio of the default and tiny presets). The rule picks the deepest shape that
   still sees `train.tokens_per_param` training tokens per parameter within the budget
   (the embedding counts: at these sizes it is a large share of the model and of the head's
   matmul). Chinchilla's compute-optimal ratio is 20 (Hoffmann et al. 2022), fitted at 70M
   parameters and up; at 100 s on 2 CPU cores it picked a 1 x 32 model, and 1 token per
   parameter trained the best model of 0.25, 0.5, 1, 2, 5 and 20 (BENCHMARKS.md), so 1 is
   the default. Larger budgets and GPUs may want more: the ratio is a setting.
3. Learning rates. `train.lr` (AdamW: with Muon, the embedding, head and gains) was set
   for the configured width; it is scaled by sqrt(configured width / chosen width), as
   nanochat scales its AdamW rates with width. Muon's rate stays: its update is already
   normalised per matrix shape. Warmup is capped at a tenth of the steps.
4. Steps. What the budget has left after the probe and a reserve for the final save, times
   the chosen shape's measured tokens per second, divided by tokens per step; periodic
   evaluation is counted in (an eval batch costs about a third of a training step).

The resolved values and the reason for each are returned as params for the run. A run
that resumes takes the resolved config from its checkpoint instead of probing again.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model import GPTConfig
from tasks.modeling import parallel
from tasks.modeling.task_data import gpt_config_for, open_task_data
from tasks.train.trainer import make_optimizer
from tokenmill.errors import TokenmillError

HEAD_DIM = 32  # n_embd = HEAD_DIM * n_layer, one head per layer of depth
MAX_DEPTH = 48
PROBE_DEPTHS = (2, 6)  # the two shapes that fix the throughput line
WARMUP_STEPS, WARMUP_S = 2, 1.0  # at least this many steps and seconds before timing (allocator, caches)
TIMED_STEPS, TIMED_S = 3, 2.0  # then at least this many steps and seconds timed
EVAL_COST = 1 / 3  # an eval batch (forward only) against a training step (forward + backward + update)
RESERVE_S = 2.0  # the final weights, model card and checkpoint after the last step
SAFETY = 0.97  # plan for a little less than the budget: CPU speed drifts


@dataclass
class Plan:
    """A budgeted config, the throughput it was planned on, and why each value is what it is."""

    cfg: object  # tokenmill.config.RunConfig
    params: dict[str, str] = field(default_factory=dict)


def shape(depth: int) -> dict[str, int]:
    return {"n_layer": depth, "n_embd": HEAD_DIM * depth, "n_head": depth}


def probe(data, cfg, gpt_config: GPTConfig, device: torch.device) -> float:
    """Seconds per training token of this shape on `device`: real steps after a warm-up, median."""
    t = cfg.train
    torch.manual_seed(t.seed)
    model = data.build(gpt_config).to(device)
    optimizer = make_optimizer(model, t, device)
    accum = max(1, t.grad_accum if t.tokens_per_step is None else t.tokens_per_step // (t.batch_size * data.block_size))
    generator = torch.Generator().manual_seed(t.seed)

    def one_step() -> float:
        start = time.perf_counter()
        for _ in range(accum):
            rows = torch.randint(len(data), (t.batch_size,), generator=generator).numpy()
            batch = tuple(b.to(device) for b in data.batch(rows))
            _, loss = model(*data.inputs(batch))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    warm = [one_step() for _ in range(WARMUP_STEPS)]
    while sum(warm) < WARMUP_S:
        warm.append(one_step())
    times = [one_step() for _ in range(TIMED_STEPS)]
    while sum(times) < TIMED_S:
        times.append(one_step())
    return sorted(times)[len(times) // 2] / (accum * t.batch_size * data.block_size)


def plan_budget(manifest_path, manifest: dict, cfg, started: float | None = None, keep_shape: bool = False) -> Plan:
    """The config that trains the best model `cfg.train.budget_s` allows on this device.

    `started` is when the training stage began (time.perf_counter()); the budget counts from
    there. `keep_shape` (a warm start, whose weights fix the shapes) plans only the steps.
    """
    t = cfg.train
    started = time.perf_counter() if started is None else started
    device = parallel.pick_device(t.device)
    data = open_task_data(manifest_path, manifest, cfg)
    vocab, block = manifest["tokenizer"]["vocab_size"], data.block_size
    world = t.nproc_per_node  # ranks on this node, each stepping through its own micro-batches
    tokens_per_step = t.tokens_per_step or t.batch_size * block * t.grad_accum * world
    configured = {"n_layer": cfg.model.n_layer, "n_head": cfg.model.n_head, "n_embd": cfg.model.n_embd}

    def config(fields: dict) -> GPTConfig:
        return gpt_config_for(cfg, vocab, block, **fields)

    def cost(fields: dict) -> tuple[int, int]:
        """(training FLOPs per token, parameters) of a shape, from a model on the meta device."""
        with torch.device("meta"):
            model = data.build(config(fields))
        return model.flops_per_token(), sum(p.numel() for p in model.parameters())

    def seconds_per_token(fields: dict) -> float:
        return probe(data, cfg, config(fields), device)

    if keep_shape:
        chosen, measured, line = configured, {}, None
    else:
        measured = {d: seconds_per_token(shape(d)) for d in PROBE_DEPTHS}
        (d1, s1), (d2, s2) = measured.items()
        f1, f2 = cost(shape(d1))[0], cost(shape(d2))[0]
        slope = max((s2 - s1) / (f2 - f1), 1e-18)  # seconds per FLOP
        line = (slope, max(s1 - slope * f1, 0.0))  # and seconds per token that no matmul explains
    eval_share = EVAL_COST * t.eval_batches / t.eval_interval
    usable = t.budget_s * SAFETY - (time.perf_counter() - started) - RESERVE_S  # seconds of stepping left

    def tokens_within(s_per_token: float) -> float:
        return max(usable, 0.0) * world / (s_per_token * (1 + eval_share))

    if not keep_shape:
        chosen = shape(1)
        for depth in range(1, MAX_DEPTH + 1):
            flops, params = cost(shape(depth))
            if tokens_within(line[1] + line[0] * flops) < t.tokens_per_param * params:
                break
            chosen = shape(depth)
    measured_here = measured.get(chosen["n_layer"]) if chosen == shape(chosen["n_layer"]) else None
    probed = time.perf_counter()
    s_per_token = measured_here or seconds_per_token(chosen)
    usable -= 0 if measured_here else time.perf_counter() - probed  # the third probe's own time
    steps = int(tokens_within(s_per_token) // tokens_per_step)
    if steps < 10:
        raise TokenmillError(
            f"a budget of {t.budget_s:g} s leaves {max(usable, 0):.0f} s after the throughput probe, "
            f"{steps} steps of a {chosen['n_layer']} x {chosen['n_embd']} model on {device}; raise --budget"
        )
    flops, params = cost(chosen)
    width = chosen["n_embd"]
    lr = t.lr * math.sqrt(cfg.model.n_embd / width)
    warmup = min(t.warmup_steps, steps // 10)
    updates = {"max_steps": steps, "lr": lr, "warmup_steps": warmup, "eval_interval": min(t.eval_interval, steps)}
    resolved = cfg.model_copy(
        update={"model": cfg.model.model_copy(update=chosen), "train": t.model_copy(update=updates)}
    )
    if keep_shape:
        why_shape = "a warm start: the shapes of the weights it starts from"
        why_speed = f"measured {1 / s_per_token:,.0f} tok/s per rank on {device}"
    else:
        why_shape = (
            f"the deepest of n_layer=d, n_embd={HEAD_DIM}d, d heads that sees >= {t.tokens_per_param:g} tokens "
            f"per parameter within the budget: d={chosen['n_layer']} ({params:,} parameters, "
            f"{steps * tokens_per_step / params:.1f} tokens each)"
        )
        why_speed = (
            f"probed d={d1}: {1 / s1:,.0f} tok/s, d={d2}: {1 / s2:,.0f} tok/s per rank on {device}; "
            f"d={chosen['n_layer']}: {1 / s_per_token:,.0f} tok/s"
        )
    params_out = {
        "budget.s": f"{t.budget_s:g}",
        "budget.device": str(device),
        "budget.n_layer": str(chosen["n_layer"]),
        "budget.n_embd": str(width),
        "budget.n_head": str(chosen["n_head"]),
        "budget.params": str(params),
        "budget.max_steps": str(steps),
        "budget.lr": f"{lr:.6g}",
        "budget.warmup_steps": str(warmup),
        "budget.tokens": str(steps * tokens_per_step),
        "budget.tokens_per_step": str(tokens_per_step),
        "budget.tokens_per_s": f"{world / s_per_token:.0f}",
        "budget.reason.shape": why_shape,
        "budget.reason.throughput": why_speed,
        "budget.reason.max_steps": (
            f"{usable:.0f} s of stepping left after the probe, a {RESERVE_S:g} s reserve and x{SAFETY} for drift, "
            f"periodic eval included: {steps} steps of {tokens_per_step:,} tokens"
        ),
        "budget.reason.lr": (
            f"train.lr {t.lr:g} is set for width {cfg.model.n_embd}: x sqrt({cfg.model.n_embd}/{width}); "
            f"train.muon_lr {t.muon_lr:g} kept (Muon normalises its update per matrix)"
        ),
    }
    return Plan(resolved, params_out)


def budgeted(manifest_path, manifest: dict, cfg, out_dir, resuming: bool, tracker, keep_shape: bool = False):
    """`cfg` with `train.budget_s` resolved into shapes, rates and steps, announced and logged
    as params. A run that resumes keeps what its first attempt planned (its run.json)."""
    from tokenmill.console import step

    started = time.perf_counter()
    record = Path(out_dir) / "run.json"
    if resuming and record.exists():
        planned = json.loads(record.read_text()).get("config") or {}
        if planned.get("train", {}).get("budget_s") == cfg.train.budget_s:
            step(f"budget: resuming with the plan of the first attempt ({record})")
            return type(cfg).model_validate(planned)
    step(f"budget {cfg.train.budget_s:g} s: probing throughput on {parallel.pick_device(cfg.train.device)}")
    plan = plan_budget(manifest_path, manifest, cfg, started, keep_shape)
    m, t = plan.cfg.model, plan.cfg.train
    step(
        f"budget: {m.n_layer} layers x {m.n_embd} wide ({int(plan.params['budget.params']):,} parameters), "
        f"{t.max_steps} steps of {int(plan.params['budget.tokens_per_step']):,} tokens at "
        f"{int(plan.params['budget.tokens_per_s']):,} tok/s, lr {t.lr:.3g}"
    )
    tracker.log_params(plan.params)
    return plan.cfg
