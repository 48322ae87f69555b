"""Generation benchmark: `GPT.generate` with its KV cache against without, side by side.

Issue "Fast generation". Two shapes, untrained fp32 weights on CPU, batch 1, the sampling
that evaluation uses (temperature 0.8, top-k 50, a seeded generator):

- small:   the `small` preset (GPT-2 124M: 12 layers x 768, context 1024), vocab 32000,
           a 512-token prompt and 128 new tokens; goal: cached >= 5x faster;
- default: the `default` run preset's model (4 layers x 128, context 128), vocab 4096, a
           16-token prompt and 64 new tokens, as evaluation samples; goal: no slower.

`use_cache=False` is the loop `generate` had before the cache: the whole cropped context
through the network at every step. Each repetition times both back to back, alternating
which goes first, and checks that they produced the same tokens. The speedup is the median
of the repetitions' ratios, the figure least disturbed by other work on a shared machine.
The uncached small shape takes minutes per repetition on 2 cores.

    .venv/bin/python benchmarks/generate.py                            # 3 and 20 repetitions
    .venv/bin/python benchmarks/generate.py --shapes default --json gen.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.shapes import gpt_config  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

SHAPES = {
    "small": {
        "config": gpt_config(GPTConfig, "small", vocab_size=32000, block_size=1024),
        "prompt": 512,
        "new": 128,
        "repeats": 3,
    },
    "default": {
        "config": GPTConfig(vocab_size=4096, block_size=128, n_layer=4, n_head=4, n_embd=128),
        "prompt": 16,
        "new": 64,
        "repeats": 20,
    },
}
TEMPERATURE, TOP_K, SEED = 0.8, 50, 1337


def timed_generate(model: GPT, prompt: torch.Tensor, new: int, use_cache: bool) -> tuple[float, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    started = time.perf_counter()
    out = model.generate(prompt, new, temperature=TEMPERATURE, top_k=TOP_K, generator=generator, use_cache=use_cache)
    return time.perf_counter() - started, out


def bench_shape(name: str, repeats: int) -> dict:
    shape = SHAPES[name]
    cfg: GPTConfig = shape["config"]
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, shape["prompt"]), generator=torch.Generator().manual_seed(0))
    for use_cache in (True, False):  # warm the allocator and kernels before anything is timed
        timed_generate(model, prompt, 2, use_cache)
    cached, uncached, same = [], [], True
    for r in range(repeats):
        outs = {}
        for use_cache in (True, False) if r % 2 == 0 else (False, True):
            seconds, outs[use_cache] = timed_generate(model, prompt, shape["new"], use_cache)
            (cached if use_cache else uncached).append(seconds)
            print(f"  {name} repeat {r} {'cached' if use_cache else 'uncached':<8} {seconds:9.3f} s", file=sys.stderr)
        same = same and torch.equal(outs[True], outs[False])
    ratios = [u / c for c, u in zip(cached, uncached)]
    return {
        "model": f"{cfg.n_layer}x{cfg.n_embd}, {cfg.n_head} heads, context {cfg.block_size}, vocab {cfg.vocab_size}",
        "prompt_tokens": shape["prompt"],
        "new_tokens": shape["new"],
        "repeats": repeats,
        "cached_s": statistics.median(cached),
        "uncached_s": statistics.median(uncached),
        "speedup": statistics.median(ratios),
        "speedup_per_repeat": [round(x, 3) for x in ratios],
        "same_tokens": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["small", "default"])
    parser.add_argument("--repeats", type=int, help="cached/uncached pairs per shape (default: 3 small, 20 default)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = {name: bench_shape(name, args.repeats or SHAPES[name]["repeats"]) for name in args.shapes}
    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "sampling": f"temperature {TEMPERATURE}, top_k {TOP_K}, seed {SEED}",
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],  # 1 minute
        "shapes": results,
    }
    print(
        f"{'shape':<8} {'model':<44} {'prompt+new':>10} {'cached s':>9} {'uncached s':>10} {'speedup':>8}  same tokens"
    )
    for name, r in results.items():
        print(
            f"{name:<8} {r['model']:<44} {r['prompt_tokens']:>5}+{r['new_tokens']:<4} {r['cached_s']:>9.3f} "
            f"{r['uncached_s']:>10.3f} {r['speedup']:>7.2f}x  {r['same_tokens']}"
        )
        print(f"{'':<8} per repeat: {', '.join(f'{x:.2f}' for x in r['speedup_per_repeat'])}")
    print(f"load average before/after: {figures['load_average_before_after']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
