"""CPU training benchmark: the whole training path against a bare loop, and the loader alone.

Issue 4, "Performance", CPU bullets. Three measurements, in one process, interleaved:

- full:   `tasks.train.trainer.train` end to end, timed from call to return: shards opened and
          memory-mapped, rows gathered by the sampler, metrics logged through a tracker
          that writes JSON lines (as the torchrun launcher's does), a progress callback
          every step, checkpoints as configured and at the end, and the final weights;
- bare:   the same model, batch and optimizer (AdamW, clipping) on random tokens made
          in advance, doing nothing else: no data, no logging, no checkpoints;
- loader: the sampler and `ShardSet.rows` alone, producing the same batches as fast as
          it can, against the tokens/s the full path consumes.

Goals: full >= 0.95 x bare, and loader >= 20 x full. Full and bare run back to back in
pairs, alternating which goes first; the reported ratio is the median of the pairs' ratios,
the figure least disturbed by other work on a shared machine. Periodic eval is work of its
own, not training, so it is off here (eval_interval > steps); pass --eval to include it.

    .venv/bin/python benchmarks/cpu_train.py --json cpu.json       # synthetic shards, default preset
    .venv/bin/python benchmarks/cpu_train.py --shards .tokenmill/shards/<corpus>-<key>/manifest.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import GPT, GPTConfig  # noqa: E402
from tasks.core.atomic import sha256_file  # noqa: E402
from tasks.core.shards import ShardSet, write_shard  # noqa: E402
from tasks.modeling.task_data import gpt_config_for  # noqa: E402
from tasks.train import trainer  # noqa: E402
from tasks.train.launch import EventWriter  # noqa: E402
from tokenmill.config import resolve_config  # noqa: E402


def synthetic_shards(root: Path, rows: int, row_len: int, vocab: int, n_shards: int = 4) -> Path:
    """Zipf-distributed uint16 tokens in real Arrow shards on disk, with a manifest."""
    rng = np.random.default_rng(0)
    shards = []
    for split, n in (("train", rows), ("val", max(64, rows // 50))):
        for i, part in enumerate(np.array_split(np.arange(n), n_shards if split == "train" else 1)):
            data = (rng.zipf(1.2, size=(len(part), row_len)) % vocab).astype(np.uint16)
            name = f"{split}-{i:05d}.arrow"
            write_shard(root / name, data, {})
            shards.append(
                {
                    "path": name,
                    "split": split,
                    "rows": len(part),
                    "tokens": int(data.size),
                    "sha256": sha256_file(root / name),
                }
            )
    (root / "tokenizer.model").write_bytes(b"synthetic")
    manifest = {
        "format": "tokenmill.shards/v1",
        "row_len": row_len,
        "shards": shards,
        "tokenizer": {"path": "tokenizer.model", "sha256": sha256_file(root / "tokenizer.model"), "vocab_size": vocab},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root / "manifest.json"


def run_full(manifest: Path, cfg, work: Path, run: int) -> float:
    out = work / f"full-{run}"
    events = EventWriter(work / f"events-{run}.jsonl")
    started = time.perf_counter()
    result = trainer.train(manifest, cfg, out, events, events.on_step)
    seconds = time.perf_counter() - started
    return result.tokens / seconds


def run_bare(gpt_config: GPTConfig, cfg, steps: int) -> float:
    t = cfg.train
    torch.manual_seed(t.seed)
    model = GPT(gpt_config)
    optimizer = model.configure_optimizer(
        t.weight_decay, t.lr, (t.beta1, t.beta2), "cpu", optimizer=t.optimizer, muon_lr=t.muon_lr
    )
    batches = torch.randint(0, gpt_config.vocab_size, (steps, t.batch_size, gpt_config.block_size + 1))
    started = time.perf_counter()
    for batch in batches:
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    return steps * t.batch_size * gpt_config.block_size / seconds


def run_loader(manifest: Path, batch_size: int, seconds: float = 2.0) -> float:
    rows = ShardSet.open(manifest, "train")
    sampler = trainer.BatchSampler(len(rows), batch_size, seed=0)
    tokens, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch = torch.from_numpy(rows.rows(sampler.next()))
        tokens += batch[:, 1:].numel()
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, help="a manifest.json (default: synthetic shards in a temp dir)")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="full/bare pairs, alternating which goes first")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="default: the preset's")
    parser.add_argument("--eval", action="store_true", help="keep the preset's periodic eval in the full path")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as tmp:
        work = Path(tmp)
        base = resolve_config(args.preset)
        manifest = args.shards or synthetic_shards(
            work, rows=20_000, row_len=base.data.context_len + 1, vocab=base.tokenizer.vocab_size
        )
        meta = json.loads(Path(manifest).read_text())
        train = {"max_steps": args.steps, "device": "cpu"}
        if not args.eval:
            train["eval_interval"] = args.steps + 1
        if args.checkpoint_every is not None:
            train["checkpoint_every"] = args.checkpoint_every
        cfg = resolve_config(args.preset, None, {"train": train})
        gpt_config = gpt_config_for(cfg, meta["tokenizer"]["vocab_size"], meta["row_len"] - 1)

        run_bare(gpt_config, cfg, 5)  # warm the allocator and kernels before anything is timed
        full, bare = [], []
        for r in range(args.repeats):  # alternate the order so drift hits both sides alike
            for side in ("full", "bare") if r % 2 == 0 else ("bare", "full"):
                if side == "full":
                    full.append(run_full(Path(manifest), cfg, work, r))
                else:
                    bare.append(run_bare(gpt_config, cfg, args.steps))
                print(
                    f"  repeat {r} {side:<4} {(full if side == 'full' else bare)[-1]:>10,.0f} tokens/s", file=sys.stderr
                )
        loader = run_loader(Path(manifest), cfg.train.batch_size)

    figures = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "preset": args.preset,
        "steps": args.steps,
        "repeats": args.repeats,
        "model": f"{gpt_config.n_layer}x{gpt_config.n_embd}, vocab {gpt_config.vocab_size}, "
        f"context {gpt_config.block_size}",
        "batch": cfg.train.batch_size,
        "checkpoint_every": cfg.train.checkpoint_every,
        "shards": str(args.shards) if args.shards else "synthetic, 20000 rows in 4 train shards",
        "load_average_before_after": [round(x, 2) for x in (*load_before, *os.getloadavg())],
        "full_tokens_per_s": statistics.median(full),
        "bare_tokens_per_s": statistics.median(bare),
        # Each pair ran back to back, so its ratio is the least disturbed by other work on the machine.
        "full_over_bare": statistics.median(f / b for f, b in zip(full, bare)),
        "full_over_bare_per_repeat": [round(f / b, 4) for f, b in zip(full, bare)],
        "loader_tokens_per_s": loader,
        "loader_over_full": loader / statistics.median(full),
    }
    for key in ("full_tokens_per_s", "bare_tokens_per_s", "full_over_bare", "loader_tokens_per_s", "loader_over_full"):
        print(f"{key:<20} {figures[key]:,.3f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
