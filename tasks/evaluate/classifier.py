"""Evaluation of a text classifier on the frozen eval set of a classification manifest.

The eval set is `eval.max_rows` documents spread evenly over the val split, all of them
when it is smaller (`tasks.modeling.metrics.spread_rows`; val rows lie grouped by class, so the
first rows alone could miss classes). It is identified by `tasks.core.manifest.eval_set_sha`,
as for a language model. Every metric comes from the
model's predictions on those documents: val_loss, accuracy, macro_f1, and per class
`precision.<label>` and `recall.<label>` (see `tasks.modeling.metrics.classification_metrics`).
The confusion matrix travels with the result, for the report's plot.

    result = evaluate_classifier(manifest_path, manifest, local_model, cfg.eval)
"""

from __future__ import annotations

from pathlib import Path

from tasks.core import manifest as mf
from tasks.core.shards import LabelledShardSet
from tasks.core.spec import task_spec
from tasks.modeling.checkpoint import weights_sha256
from tasks.modeling.evaluation import Evaluation
from tasks.modeling.local_model import LocalModel, require_same_tokenizer
from tasks.modeling.metrics import classification_metrics, confusion_matrix, cross_entropy, predict_labelled
from tasks.modeling.parallel import pick_device
from tasks.modeling.pyfunc_io import load_network
from tasks.modeling.task_data import manifest_task
from tokenmill.config import EvalConfig
from tokenmill.errors import TokenmillError


def check_fits(manifest: dict, manifest_path: Path, local: LocalModel) -> list[str]:
    """The label names, when the manifest holds labelled shards the model can score."""
    if not task_spec(manifest_task(manifest)).labelled:
        raise TokenmillError(
            f"{manifest_path} holds {manifest_task(manifest)} shards, not labelled documents; "
            f"evaluate a classifier on shards preprocessed with task=classify"
        )
    require_same_tokenizer(local, manifest)
    labels = list(manifest["labels"])
    if local.head and list(local.head["labels"]) != labels:
        raise TokenmillError(
            f"the model's labels {list(local.head['labels'])} differ from the shards' {labels}; "
            f"evaluate on shards preprocessed with the model's labels"
        )
    return labels


def evaluate_classifier(
    manifest_path: Path, manifest: dict, local: LocalModel, cfg: EvalConfig, device: str = "auto"
) -> Evaluation:
    """Loss, accuracy, macro-F1 and per-class precision and recall on the frozen eval set."""
    labels = check_fits(manifest, manifest_path, local)
    if not local.head:
        raise TokenmillError(
            f"{local.weights} is a language model without a classification head; "
            f"use it on language-model shards, or train a classifier with task=classify"
        )
    dev = pick_device(device)
    model, state = load_network(local.weights, local.gpt_config, local.head, dev)
    val = LabelledShardSet.open(manifest_path, "val")
    if not len(val):
        raise TokenmillError(f"{manifest_path} has no val documents; preprocess with a larger data.val_fraction")
    logits, actual = predict_labelled(model, val, cfg.max_rows, cfg.batch_size, dev)
    matrix = confusion_matrix(actual, logits.argmax(axis=1), len(labels))
    metrics = {
        "val_loss": cross_entropy(logits, actual),
        **classification_metrics(matrix, labels),
        "val_rows": float(len(actual)),
    }
    return Evaluation(
        local,
        metrics,
        mf.eval_set_sha(manifest, cfg.max_rows),
        cfg.max_rows,
        weights_sha256(state),
        task="classify",
        confusion=matrix.tolist(),
    )
