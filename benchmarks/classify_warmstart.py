"""Classification: warm start from a language model vs training from scratch, in one run.

Issue 7 acceptance: a classifier warm-started from a language model trained on the same
texts reaches a given val accuracy in fewer steps than one trained from scratch.

1. Labelled shards of the corpus (a tokenizer is trained on it), then language-model shards
   of the same texts with that same tokenizer (`tokenizer.reuse`).
2. A language model trained on the LM shards.
3. Two classifiers on the labelled shards, identical in config, seed and data order: one
   from scratch, one whose backbone starts from the language model (fresh head). Each logs
   val accuracy on the whole val split every K steps, and is scored at the end with the
   evaluation stage's metrics (accuracy, macro-F1).

Reported: both curves side by side, and for each target accuracy the first logged step at
which each run reaches it. Steps, not seconds, are the measure, so the machine's load does
not change the result; wall time is recorded for reference.

    .venv/bin/python benchmarks/classify_warmstart.py --json warmstart.json     # stdlib-packages, tiny preset
    .venv/bin/python benchmarks/classify_warmstart.py --corpus my-labelled --preset default --max-len 128
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_catalog.loader import resolve_corpus  # noqa: E402
from tasks.evaluate.stage import evaluate  # noqa: E402
from tasks.modeling import checkpoint  # noqa: E402
from tasks.modeling.local_model import from_manifest  # noqa: E402
from tasks.preprocess.stage import preprocess_corpus  # noqa: E402
from tasks.train import trainer
from tokenmill.config import EvalConfig, deep_merge, resolve_config  # noqa: E402

CURVE = "val_accuracy_periodic"


class Curve:
    """A tracker that keeps the periodic val accuracy by step."""

    def __init__(self) -> None:
        self.points: dict[int, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if CURVE in metrics:
            self.points[step] = float(metrics[CURVE])


def steps_to_reach(points: dict[int, float], target: float) -> int | None:
    """The first logged step whose val accuracy is at least `target`; None if none is."""
    return next((step for step, acc in sorted(points.items()) if acc >= target), None)


def configs(corpus, preset: str, args, n_val: int):
    entry = {"data": corpus.entry.data, "tokenizer": corpus.entry.tokenizer}
    common = {"classify": {"max_len": args.max_len}}
    lm = resolve_config(preset, {**entry, "task": "lm"}, deep_merge(common, {"train": {"max_steps": args.lm_steps}}))
    # Every K steps the whole val split, and a final point at the last step (the loop itself skips it).
    eval_batches = math.ceil(n_val / lm.train.batch_size)
    clf_train = {
        "max_steps": args.steps,
        "eval_interval": args.every,
        "eval_batches": eval_batches,
        "checkpoint_every": 0,
    }
    clf = resolve_config(preset, {**entry, "task": "classify"}, deep_merge(common, {"train": clf_train}))
    return lm, clf


def train_classifier(manifest: Path, cfg, out: Path, warm, n_val: int) -> dict:
    curve = Curve()
    started = time.perf_counter()
    result = trainer.train(manifest, cfg, out, curve, warm=warm)
    seconds = time.perf_counter() - started
    local = dataclasses.replace(from_manifest(result.weights, result.gpt_config, manifest), head=result.head)
    final = evaluate(manifest, local, EvalConfig(max_rows=n_val, batch_size=cfg.train.batch_size))
    curve.points[result.steps] = final.metrics["accuracy"]
    return {
        "curve": curve.points,
        "accuracy": final.metrics["accuracy"],
        "macro_f1": final.metrics["macro_f1"],
        "val_loss": final.metrics["val_loss"],
        "seconds": round(seconds, 1),
    }


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    corpus = resolve_corpus(args.corpus, Path(args.catalog) if args.catalog else None)
    shards_root = Path(args.work) / "shards"
    probe = resolve_config(
        args.preset,
        {"data": corpus.entry.data, "tokenizer": corpus.entry.tokenizer, "task": "classify"},
        {"classify": {"max_len": args.max_len}},
    )
    started = time.perf_counter()
    labelled = preprocess_corpus.fn(corpus, probe.tokenizer, probe.data, shards_root, classify=probe.classify)
    manifest = json.loads(labelled.read_text())
    n_val = sum(manifest["label_counts"]["val"].values())
    lm_cfg, clf_cfg = configs(corpus, args.preset, args, n_val)
    tokenizer = labelled.parent / manifest["tokenizer"]["path"]
    lm_shards = preprocess_corpus.fn(corpus, lm_cfg.tokenizer, lm_cfg.data, shards_root, reuse_tokenizer=tokenizer)
    prep_seconds = time.perf_counter() - started

    started = time.perf_counter()
    lm = trainer.train(lm_shards, lm_cfg, Path(args.work) / "lm")
    lm_seconds = time.perf_counter() - started
    warm = checkpoint.warm_start_source(lm.weights)  # shapes and tokenizer from the model card beside it

    scratch = train_classifier(labelled, clf_cfg, Path(args.work) / "scratch", None, n_val)
    warmed = train_classifier(labelled, clf_cfg, Path(args.work) / "warm", warm, n_val)
    targets = {
        str(t): {"scratch": steps_to_reach(scratch["curve"], t), "warm": steps_to_reach(warmed["curve"], t)}
        for t in args.targets
    }
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s)",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "corpus": corpus.name,
        "labels": manifest["labels"],
        "label_counts": manifest["label_counts"],
        "tokenizer_sha256": manifest["tokenizer"]["sha256"],
        "vocab_size": manifest["tokenizer"]["vocab_size"],
        "model": clf_cfg.model.model_dump(),
        "max_len": args.max_len,
        "batch_size": clf_cfg.train.batch_size,
        "lr": clf_cfg.train.lr,
        "seed": clf_cfg.train.seed,
        "lm": {"steps": lm.steps, "final_loss": lm.final_loss, "tokens": lm.tokens, "seconds": round(lm_seconds, 1)},
        "preprocess_seconds": round(prep_seconds, 1),
        "majority_class_accuracy": max(manifest["label_counts"]["val"].values()) / n_val,
        "scratch": scratch,
        "warm": warmed,
        "steps_to_reach": targets,
    }


def print_report(r: dict) -> None:
    print(
        f"{r['corpus']}: {len(r['labels'])} classes, {sum(r['label_counts']['train'].values())} train / "
        f"{sum(r['label_counts']['val'].values())} val documents; LM {r['lm']['steps']} steps "
        f"(loss {r['lm']['final_loss']:.3f}, {r['lm']['seconds']} s); majority class {r['majority_class_accuracy']:.3f}"
    )
    print(f"{'step':>6} {'scratch':>8} {'warm':>8}")
    for step in sorted(set(r["scratch"]["curve"]) | set(r["warm"]["curve"])):
        a, b = r["scratch"]["curve"].get(step), r["warm"]["curve"].get(step)
        print(f"{step:>6} {a if a is None else f'{a:.3f}':>8} {b if b is None else f'{b:.3f}':>8}")
    for target, steps in r["steps_to_reach"].items():
        print(
            f"val accuracy >= {target}: scratch {steps['scratch'] or 'not reached'}, "
            f"warm {steps['warm'] or 'not reached'} steps"
        )
    for name in ("scratch", "warm"):
        x = r[name]
        print(
            f"{name:>7}: accuracy {x['accuracy']:.4f}, macro_f1 {x['macro_f1']:.4f}, "
            f"val_loss {x['val_loss']:.4f}, {x['seconds']} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="stdlib-packages", help="a labelled catalog entry")
    parser.add_argument("--catalog", default=None)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--lm-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=300, help="classifier steps, the same for both runs")
    parser.add_argument("--every", type=int, default=25, help="steps between val accuracy points")
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (steps, not speed, are measured)")
    parser.add_argument("--work", default=None, help="work dir (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tokenmill-warmstart-") as tmp:
        args.work = args.work or tmp
        result = run(args)
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
