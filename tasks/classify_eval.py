"""Evaluation of a text classifier on the frozen eval set of a classification manifest.

The eval set is `eval.max_rows` documents spread evenly over the val split, all of them
when it is smaller (`tasks.metrics.spread_rows`; val rows lie grouped by class, so the
first rows alone could miss classes). It is identified by `tasks.manifest.eval_set_sha`,
as for a language model. Every metric comes from the
model's predictions on those documents: val_loss, accuracy, macro_f1, and per class
`precision.<label>` and `recall.<label>` (see `tasks.metrics.classification_metrics`).
The confusion matrix travels with the result, for the report's plot.

    result = evaluate_classifier(manifest_path, local_model, cfg.eval)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model import GPTClassifier, GPTConfig
from tasks import manifest as mf
from tasks.checkpoint import weights_sha256
from tasks.evaluate import Evaluation, require_same_tokenizer
from tasks.metrics import classification_metrics, confusion_matrix, cross_entropy, predict_labelled
from tasks.model_store import LocalModel
from tasks.shards import LabelledShardSet
from tasks.trainer import pick_device
from tasks.training_data import manifest_task
from tokenmill.config import EvalConfig
from tokenmill.errors import TokenmillError


def load_classifier(local: LocalModel, device: torch.device) -> tuple[GPTClassifier, str]:
    """The classifier in eval mode and the sha256 of its weights (loaded with weights_only)."""
    if not local.head:
        raise TokenmillError(
            f"{local.weights} is a language model without a classification head; "
            f"use it on language-model shards, or train a classifier with task=classify"
        )
    state = torch.load(local.weights, map_location="cpu", weights_only=True)
    model = GPTClassifier(GPTConfig(**local.gpt_config), len(local.head["labels"]), local.head.get("pooling", "mean"))
    model.load_state_dict(state)
    return model.to(device).eval(), weights_sha256(state)


def check_fits(manifest: dict, manifest_path: Path, local: LocalModel) -> list[str]:
    """The label names, when the manifest holds labelled shards the model can score."""
    if manifest_task(manifest) != "classify":
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


def evaluate_classifier(manifest_path: Path, local: LocalModel, cfg: EvalConfig, device: str = "auto") -> Evaluation:
    """Loss, accuracy, macro-F1 and per-class precision and recall on the frozen eval set."""
    manifest = json.loads(Path(manifest_path).read_text())
    labels = check_fits(manifest, manifest_path, local)
    dev = pick_device(device)
    model, weights_sha = load_classifier(local, dev)
    val = LabelledShardSet.open(manifest_path, "val")
    if not len(val):
        raise TokenmillError(f"{manifest_path} has no val documents; preprocess with a larger data.val_fraction")
    logits, actual = predict_labelled(model, val, cfg.max_rows, cfg.batch_size, dev)
    matrix = confusion_matrix(actual, logits.argmax(axis=1), len(labels))
    metrics = {"val_loss": cross_entropy(logits, actual), **classification_metrics(matrix, labels),
               "val_rows": float(len(actual))}
    return Evaluation(local, metrics, mf.eval_set_sha(manifest, cfg.max_rows), cfg.max_rows, weights_sha,
                      task="classify", confusion=matrix.tolist())
