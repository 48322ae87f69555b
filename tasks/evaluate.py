"""Evaluation stage: a trained model scored on the frozen eval set of its manifest.

The eval set is the first `eval.max_rows` rows of the val split, identified by a sha256
of the val shards' content, so two models compare only when they saw the same rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from model import GPT, GPTConfig
from tasks import manifest as mf, tokenizer as tok
from tasks.policy import retry_transient
from tasks.metrics import evaluate_rows, unigram_entropy
from tasks.shards import ShardSet
from tasks.trainer import pick_device
from tasks.tracking import MlflowTracker
from tokenmill.config import EvalConfig
from tokenmill.console import step


def load_model(weights: Path, gpt_config: dict, device: torch.device) -> GPT:
    model = GPT(GPTConfig(**gpt_config))
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.to(device).eval()


def score(manifest_path: Path, weights: Path, gpt_config: dict, cfg: EvalConfig, device: str = "auto") -> dict[str, float | str]:
    manifest = json.loads(Path(manifest_path).read_text())
    dev = pick_device(device)
    model = load_model(weights, gpt_config, dev)
    val = ShardSet.open(manifest_path, "val")
    sp = tok.load((Path(manifest_path).parent / manifest["tokenizer"]["path"]).read_bytes())
    metrics: dict[str, float | str] = evaluate_rows(model, val, cfg.max_rows, cfg.batch_size, tok.piece_byte_lengths(sp), dev)
    metrics["val_unigram_entropy"] = unigram_entropy(val, cfg.max_rows, manifest["tokenizer"]["vocab_size"])
    metrics["eval_set_sha256"] = mf.eval_set_sha(manifest, cfg.max_rows)
    return metrics


@task(name="evaluate", retries=1, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def evaluate_model(manifest_path: Path, weights: Path, gpt_config: dict, cfg: EvalConfig, run_id: str | None) -> dict:
    step("evaluating on the frozen eval set")
    metrics = score(manifest_path, weights, gpt_config, cfg)
    if run_id:
        MlflowTracker(run_id).log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)}, step=0)
    return metrics
