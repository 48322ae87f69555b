"""Time to quality: the modern recipe against the gpt2 recipe at equal wall-clock budgets.

Issue 15, item 3. For each corpus, the shards are built once (`tokenmill preprocess`); then,
for each budget, each recipe trains through the budget dial (`tokenmill train --budget B
--set recipe=R`: the same probe and the same shapes rule for both), back to back so the
two see the same machine state, and the trained weights are scored on the first
`--eval-rows` rows of the val split, as the pipeline's evaluation does (val_bpb: bits per
byte of the original text, so tokenizers and models compare fairly).

It then reports, per corpus, val_bpb at each budget, and how long the modern recipe needs to
reach the gpt2 recipe's val_bpb at the largest budget: the smallest budget at which it
already does, interpolated linearly in log(time) between the two budgets around the target.

    .venv/bin/python benchmarks/time_to_quality.py --out ttq.json                   # 2, 5, 10 min
    .venv/bin/python benchmarks/time_to_quality.py --corpora python-stdlib \\
        --budgets 0.5 1 --out quick.json                                            # a smoke run
    .venv/bin/python benchmarks/time_to_quality.py --corpora CORPUS --budgets 2 \\
        --gpt2-extra 10 --extra 3.5 --out other.json      # only what the 3x goal needs: gpt2 at 10

Every training process gets the machine's cores to itself: nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKENMILL = str(Path(sys.executable).with_name("tokenmill"))
VIM_DOCS = "/usr/share/vim/vim90/doc/*.txt"  # English prose (Vim's manuals), where vim is installed


def tokenmill(*args: str, env: dict) -> str:
    done = subprocess.run([TOKENMILL, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"tokenmill {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def val_bpb(manifest: Path, weights: Path, gpt_config: dict, rows: int) -> float:
    """Bits per byte on the first `rows` val rows: the pipeline's own evaluation code."""
    import torch

    from tasks.core.shards import ShardSet
    from tasks.core.tokenizer import load_tokenizer, piece_byte_lengths
    from tasks.modeling.metrics import evaluate_rows
    from tasks.modeling.pyfunc_io import load_network

    info = json.loads(manifest.read_text())
    model, _ = load_network(weights, gpt_config, None, torch.device("cpu"))
    sp = load_tokenizer((manifest.parent / info["tokenizer"]["path"]).read_bytes())
    metrics = evaluate_rows(
        model, ShardSet.open(manifest, "val"), rows, 32, piece_byte_lengths(sp), torch.device("cpu")
    )
    return metrics["val_bpb"]


def train_once(manifest: Path, recipe: str, minutes: float, preset: str, root: Path, env: dict, rows: int) -> dict:
    out = root / f"{manifest.parent.name}-{recipe}-{minutes:g}m"
    start = time.perf_counter()
    stdout = tokenmill(
        "train",
        "--shards",
        str(manifest),
        "--preset",
        preset,
        "--budget",
        f"{minutes * 60:g}s",
        "--set",
        f"recipe={recipe}",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--json",
        env=env,
    )
    wall = time.perf_counter() - start
    result = json.loads(stdout.strip().splitlines()[-1])
    gpt = result["gpt_config"]
    return {
        "recipe": recipe,
        "budget_s": minutes * 60,
        "train_wall_s": round(wall, 1),
        "train_seconds": round(result["seconds"], 1),
        # The whole `tokenmill train` process (start-up, probe, training, final save): an upper bound
        # on the training stage's time.
        "within_10pct": abs(wall - minutes * 60) <= 0.1 * minutes * 60,
        "shape": f"{gpt['n_layer']}x{gpt['n_embd']}",
        "steps": result["steps"],
        "tokens": result["tokens"],
        "tokens_per_second": round(result["tokens_per_second"]),
        "val_bpb": val_bpb(manifest, Path(result["weights"]), gpt, rows),
    }


def time_to_reach(target: float, points: list[tuple[float, float]]) -> float | None:
    """Seconds at which a (seconds, val_bpb) curve first reaches `target`, interpolated linearly
    in log(time); the smallest budget when it already does there (an upper bound); None if never."""
    points = sorted(points)
    if not points or points[0][1] <= target:
        return points[0][0] if points else None
    for (t0, b0), (t1, b1) in zip(points, points[1:]):
        if b1 <= target:
            frac = (b0 - target) / (b0 - b1)
            return math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0)))
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", nargs="+", default=["python-stdlib", VIM_DOCS])
    parser.add_argument("--budgets", nargs="*", type=float, default=[2, 5, 10], help="minutes, both recipes")
    parser.add_argument("--extra", nargs="*", type=float, default=[3.5], help="minutes, modern recipe only")
    parser.add_argument("--gpt2-extra", nargs="*", type=float, default=[], help="minutes, gpt2 recipe only")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--eval-rows", type=int, default=2048)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="ttq-"))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # untracked runs
    env["TOKENMILL_HOME"] = str(root / "home")
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "corpora": {},
    }
    for corpus in args.corpora:
        manifest = Path(tokenmill("preprocess", corpus, env=env).strip().splitlines()[-1])
        runs = []
        plan = [(m, r) for m in args.budgets for r in ("gpt2", "modern")]
        plan += [(m, "gpt2") for m in args.gpt2_extra] + [(m, "modern") for m in args.extra]
        for minutes, recipe in plan:
            runs.append(train_once(manifest, recipe, minutes, args.preset, root, env, args.eval_rows))
            print(json.dumps({"corpus": corpus, **runs[-1]}), flush=True)
            report["corpora"][corpus] = summarise(runs, max(args.budgets + args.gpt2_extra, default=0) * 60)
            args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({c: {k: v for k, v in s.items() if k != "runs"} for c, s in report["corpora"].items()}, indent=2))


def summarise(runs: list[dict], longest_s: float) -> dict:
    curve = {r: [(x["budget_s"], x["val_bpb"]) for x in runs if x["recipe"] == r] for r in ("gpt2", "modern")}
    target = dict(curve["gpt2"]).get(longest_s)
    summary = {"runs": runs, "target_val_bpb": target}
    if target is not None:
        reach = time_to_reach(target, curve["modern"])
        summary["modern_time_to_target_s"] = reach
        summary["speedup"] = longest_s / reach if reach else None
    return summary


if __name__ == "__main__":
    main()
