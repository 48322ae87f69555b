"""Evaluation stage: a model scored on the frozen eval set of a manifest, plus a report.

The eval set is the first `eval.max_rows` rows of the val split, identified by a sha256 of
the val shards' content, so two models compare only when they saw the same rows. Any model
can be scored on any manifest built with its tokenizer (`tokenmill evaluate`).

The manifest's task picks the evaluation: a language model gets loss, perplexity, bits per
byte and sample generations; a classifier (`tasks.classify_eval`) gets accuracy, macro-F1,
per-class precision and recall and a confusion-matrix plot, and has no generations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from model import GPT, GPTConfig
from tasks import manifest as mf, report, stage_cache, tokenizer as tok
from tasks.checkpoint import weights_sha256
from tasks.metrics import evaluate_rows, unigram_entropy
from tasks.model_store import LocalModel, from_manifest
from tasks.policy import retry_transient
from tasks.shards import ShardSet
from tasks.trainer import pick_device
from tasks.training_data import manifest_task
from tokenmill.config import EvalConfig
from tokenmill.console import step
from tokenmill.errors import TokenmillError
from tokenmill.locks import exclusive


@dataclass
class Evaluation:
    model: LocalModel
    metrics: dict[str, float]
    eval_set_sha256: str
    eval_max_rows: int
    weights_sha256: str = ""
    samples: list[dict[str, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    task: str = "lm"
    confusion: list[list[int]] | None = None  # classify: counts, row = true label, column = predicted

    @property
    def generations_ok(self) -> bool:
        """A language model must complete every prompt; a classifier generates nothing."""
        return self.task != "lm" or report.generations_ok(self.samples)


def load_model(weights: Path, gpt_config: dict, device: torch.device) -> tuple[GPT, str]:
    """The model in eval mode and the sha256 of its weights (tensors in name order)."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**gpt_config))
    model.load_state_dict(state)
    return model.to(device).eval(), weights_sha256(state)


def require_same_tokenizer(local: LocalModel, manifest: dict) -> None:
    if local.tokenizer_sha256 != manifest["tokenizer"]["sha256"]:
        raise TokenmillError(
            f"the model's tokenizer ({local.tokenizer_sha256[:12]}) differs from the shards' "
            f"({manifest['tokenizer']['sha256'][:12]}); evaluate on shards built with the model's tokenizer"
        )


def evaluate(manifest_path: Path, local: LocalModel, cfg: EvalConfig, device: str = "auto") -> Evaluation:
    """Metrics on the frozen eval set and seeded sample generations for the fixed prompts; for
    labelled shards, a classifier's metrics (`tasks.classify_eval.evaluate_classifier`)."""
    manifest = json.loads(Path(manifest_path).read_text())
    if manifest_task(manifest) == "classify":
        from tasks.classify_eval import evaluate_classifier

        return evaluate_classifier(manifest_path, local, cfg, device)
    if local.head:
        raise TokenmillError(
            f"{local.weights} is a classifier, and {manifest_path} holds language-model shards; "
            f"evaluate it on shards preprocessed with task=classify"
        )
    require_same_tokenizer(local, manifest)
    dev = pick_device(device)
    model, weights_sha = load_model(local.weights, local.gpt_config, dev)
    val = ShardSet.open(manifest_path, "val")
    sp = tok.load(Path(local.tokenizer).read_bytes())
    metrics = evaluate_rows(model, val, cfg.max_rows, cfg.batch_size, tok.piece_byte_lengths(sp), dev)
    metrics["val_unigram_entropy"] = unigram_entropy(val, cfg.max_rows, manifest["tokenizer"]["vocab_size"])
    samples = report.sample_generations(model, sp, cfg.prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.seed, dev)
    return Evaluation(local, metrics, mf.eval_set_sha(manifest, cfg.max_rows), cfg.max_rows, weights_sha, samples)


def loss_history(run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow import MlflowClient

    client = MlflowClient()
    return {
        name: [(m.step, m.value) for m in client.get_metric_history(run_id, name)]
        for name in ("train_loss", "val_loss_periodic")
    }


@task(name="evaluate", retries=1, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def evaluate_model(manifest_path: Path, trained, cfg: EvalConfig, run_id: str | None, refresh: bool = False) -> Evaluation:
    """Score freshly trained weights (a `TrainResult`), write the report beside them, and log it
    all to the run. A verified earlier evaluation of the same weights on the same eval set is
    reused unless `refresh`."""
    local = from_manifest(trained.weights, trained.gpt_config, manifest_path, getattr(trained, "head", None))
    manifest = json.loads(Path(manifest_path).read_text())
    key = stage_cache.eval_key(trained.weights_sha256, mf.eval_set_sha(manifest, cfg.max_rows), cfg)
    models_root = Path(trained.weights).parent.parent
    with exclusive(stage_cache.record_path(models_root, key), f"evaluating the same weights (key {key[:12]})"):
        cached = None if refresh or not trained.weights_sha256 else stage_cache.lookup(models_root, key)
        if cached:
            step(f"evaluation cached (verified, key {key[:12]})")
            result = Evaluation(local, cached["metrics"], cached["eval_set_sha256"], cached["eval_max_rows"],
                                cached["weights_sha256"], cached["samples"], [Path(p) for p in cached["files"]],
                                task=cached.get("task", "lm"), confusion=cached.get("confusion"))
        else:
            result = fresh_evaluation(manifest_path, local, trained, cfg, run_id, models_root, key)
    if run_id:
        log_evaluation(run_id, result)
    return result


def fresh_evaluation(manifest_path: Path, local: LocalModel, trained, cfg: EvalConfig, run_id: str | None,
                     models_root: Path, key: str) -> Evaluation:
    """Score the model, write the report beside its weights and record both in the stage cache."""
    step("evaluating on the frozen eval set")
    result = evaluate(manifest_path, local, cfg)
    history = loss_history(run_id) if run_id else {}
    lineage = {"eval_set_sha256": result.eval_set_sha256, "manifest": str(manifest_path),
               "tokenizer_sha256": local.tokenizer_sha256, "mlflow_run_id": run_id or "-"}
    out_dir = Path(trained.weights).parent / f"eval-{key[:12]}"
    result.files = write_evaluation_report(out_dir, result, lineage, history)
    stage_cache.store(models_root, key, result.files, {
        "metrics": result.metrics, "eval_set_sha256": result.eval_set_sha256, "eval_max_rows": result.eval_max_rows,
        "weights_sha256": result.weights_sha256, "samples": result.samples, "files": [str(p) for p in result.files],
        "task": result.task, "confusion": result.confusion,
    })
    return result


def write_evaluation_report(out_dir: Path, result: Evaluation, lineage: dict, history: dict) -> list[Path]:
    """The report files of the result's task under out_dir (each written atomically)."""
    if result.task == "classify":
        return report.write_classification_report(out_dir, "tokenmill classifier evaluation", result.metrics,
                                                  list(result.model.head["labels"]), result.confusion, lineage, history)
    return report.write_report(out_dir, "tokenmill evaluation", result.metrics, result.samples, lineage, history)


def log_evaluation(run_id: str, result: Evaluation) -> None:
    from mlflow import MlflowClient

    from tasks.tracking import MlflowTracker

    MlflowTracker(run_id).log_metrics(result.metrics, step=0)
    client = MlflowClient()
    for path in result.files:
        client.log_artifact(run_id, str(path), "eval")
    if result.task == "lm":
        client.log_dict(run_id, {"samples": result.samples}, "eval/generations.json")
