"""Evaluation stage: a model scored on the frozen eval set of a manifest, plus a report.

The eval set is the first `eval.max_rows` rows of the val split, identified by a sha256 of
the val shards' content, so two models compare only when they saw the same rows. Any model
can be scored on any manifest built with its tokenizer (`tokenmill evaluate`).

The manifest's task picks the evaluation: a language model (`lm`) gets loss, perplexity, bits
per byte and sample generations; a classifier (`classifier`) gets accuracy, macro-F1, per-class
precision and recall and a confusion-matrix plot, and has no generations.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.core import manifest as mf
from tasks.core import stage_cache
from tasks.core.policy import retry_transient
from tasks.core.spec import task_spec
from tasks.evaluate import report
from tasks.evaluate.classifier import evaluate_classifier
from tasks.evaluate.lm import evaluate_lm
from tasks.modeling.evaluation import Evaluation
from tasks.modeling.local_model import LocalModel, from_manifest
from tasks.modeling.task_data import manifest_task
from tokenmill.config import EvalConfig
from tokenmill.console import step
from tokenmill.locks import exclusive, in_use

# The evaluator of each task (tasks.core.spec), by the task's name.
EVALUATORS = {"lm": evaluate_lm, "classify": evaluate_classifier}


def evaluate(manifest_path: Path, local: LocalModel, cfg: EvalConfig, device: str = "auto") -> Evaluation:
    """The metrics of the manifest's task on its frozen eval set (`lm.evaluate_lm`,
    `classifier.evaluate_classifier`)."""
    manifest = json.loads(Path(manifest_path).read_text())
    return EVALUATORS[manifest_task(manifest)](manifest_path, manifest, local, cfg, device)


def loss_history(run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow import MlflowClient

    client = MlflowClient()
    return {
        name: [(m.step, m.value) for m in client.get_metric_history(run_id, name)]
        for name in ("train_loss", "val_loss_periodic")
    }


@task(name="evaluate", retries=1, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def evaluate_model(
    manifest_path: Path, trained, cfg: EvalConfig, run_id: str | None, refresh: bool = False
) -> Evaluation:
    """Score freshly trained weights (a `TrainResult`), write the report beside them, and log it
    all to the run. A verified earlier evaluation of the same weights on the same eval set is
    reused unless `refresh`."""
    local = from_manifest(trained.weights, trained.gpt_config, manifest_path, trained.head)
    manifest = json.loads(Path(manifest_path).read_text())
    key = stage_cache.eval_key(trained.weights_sha256, mf.eval_set_sha(manifest, cfg.max_rows), cfg)
    models_root = Path(trained.weights).parent.parent
    with exclusive(stage_cache.record_path(models_root, key), f"evaluating the same weights (key {key[:12]})"):
        cached = None if refresh or not trained.weights_sha256 else stage_cache.lookup(models_root, key)
        if cached:
            step(f"evaluation cached (verified, key {key[:12]})")
            result = Evaluation(
                local,
                cached["metrics"],
                cached["eval_set_sha256"],
                cached["eval_max_rows"],
                cached["weights_sha256"],
                cached["samples"],
                [Path(p) for p in cached["files"]],
                task=cached.get("task", "lm"),
                confusion=cached.get("confusion"),
            )
        else:
            # `tokenmill gc` skips the shard dir while this process reads its val shards
            with in_use(Path(manifest_path).resolve().parent):
                result = fresh_evaluation(manifest_path, local, trained, cfg, run_id, models_root, key)
    if run_id:
        log_evaluation(run_id, result)
    return result


def fresh_evaluation(
    manifest_path: Path, local: LocalModel, trained, cfg: EvalConfig, run_id: str | None, models_root: Path, key: str
) -> Evaluation:
    """Score the model, write the report beside its weights and record both in the stage cache."""
    step("evaluating on the frozen eval set")
    result = evaluate(manifest_path, local, cfg)
    history = loss_history(run_id) if run_id else {}
    lineage = {
        "eval_set_sha256": result.eval_set_sha256,
        "manifest": str(manifest_path),
        "tokenizer_sha256": local.tokenizer_sha256,
        "mlflow_run_id": run_id or "-",
    }
    out_dir = Path(trained.weights).parent / f"eval-{key[:12]}"
    result.files = write_evaluation_report(out_dir, result, lineage, history)
    stage_cache.store(
        models_root,
        key,
        result.files,
        {
            "metrics": result.metrics,
            "eval_set_sha256": result.eval_set_sha256,
            "eval_max_rows": result.eval_max_rows,
            "weights_sha256": result.weights_sha256,
            "samples": result.samples,
            "files": [str(p) for p in result.files],
            "task": result.task,
            "confusion": result.confusion,
        },
    )
    return result


def write_evaluation_report(out_dir: Path, result: Evaluation, lineage: dict, history: dict) -> list[Path]:
    """The report files of the result's task under out_dir (each written atomically)."""
    if task_spec(result.task).labelled:
        return report.write_classification_report(
            out_dir,
            "tokenmill classifier evaluation",
            result.metrics,
            list(result.model.head["labels"]),
            result.confusion,
            lineage,
            history,
        )
    return report.write_report(out_dir, "tokenmill evaluation", result.metrics, result.samples, lineage, history)


def log_evaluation(run_id: str, result: Evaluation) -> None:
    from mlflow import MlflowClient

    from tasks.run.tracking import MlflowTracker

    MlflowTracker(run_id).log_metrics(result.metrics, step=0)
    client = MlflowClient()
    for path in result.files:
        client.log_artifact(run_id, str(path), "eval")
    if task_spec(result.task).generates:
        client.log_dict(run_id, {"samples": result.samples}, "eval/generations.json")
