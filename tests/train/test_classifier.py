"""Text classification: the pooled head, training with the shared engine, warm starts, evaluation.

The corpus is synthetic and its label is decided by content: each class owns a few tokens, and
every document mixes tokens of its own class with tokens all classes share.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from model import GPT, GPTClassifier, GPTConfig
from tasks.core.atomic import sha256_file
from tasks.core.manifest import FORMAT
from tasks.core.shards import PAD_ID, write_labelled_shard
from tasks.evaluate.stage import evaluate
from tasks.modeling import checkpoint
from tasks.modeling.checkpoint import list_checkpoints, warm_start, warm_start_source, weights_sha256
from tasks.modeling.local_model import LocalModel
from tasks.modeling.metrics import classification_metrics, confusion_matrix, metric_names, spread_rows
from tasks.modeling.pyfunc_io import load_network
from tasks.modeling.task_data import class_weights
from tasks.train import trainer
from tokenmill.config import EvalConfig, ModelConfig, resolve_config
from tokenmill.errors import TokenmillError

from train_helpers import VOCAB, Recorder, one_thread, write_corpus  # noqa: F401 (one_thread: autouse)

LABELS = ["alpha", "beta", "gamma", "delta"]
MAX_LEN = 24
OWN = 6  # tokens owned by each class: class c owns 1 + c*OWN .. (c+1)*OWN; the rest are shared


def write_labelled_corpus(root: Path, n_train=800, n_val=160, seed=0, tokenizer=b"synthetic", label_p=None) -> Path:
    """Labelled shards where a document's own-class tokens decide its label, and their manifest."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shared = np.arange(1 + OWN * len(LABELS), VOCAB)

    def docs(n):
        labels = rng.choice(len(LABELS), n, p=label_p)
        lengths = rng.integers(6, MAX_LEN + 1, n)
        tokens = np.full((n, MAX_LEN), PAD_ID, dtype=np.uint16)
        for i, (label, length) in enumerate(zip(labels, lengths)):
            own = 1 + label * OWN + rng.integers(0, OWN, length)
            tokens[i, :length] = np.where(rng.random(length) < 0.35, own, rng.choice(shared, length))
            tokens[i, rng.integers(0, length)] = own[0]  # at least one token says which class
        return tokens, lengths, labels

    shards = []
    for split, n in (("train", n_train), ("val", n_val)):
        name = f"{split}-00000.arrow"
        tokens, lengths, labels = docs(n)
        write_labelled_shard(root / name, tokens, lengths, labels, {"split": split, "row_len": MAX_LEN})
        shards.append(
            {"path": name, "split": split, "rows": n, "tokens": int(lengths.sum()), "sha256": sha256_file(root / name)}
        )
    (root / "tokenizer.model").write_bytes(tokenizer)
    manifest = {
        "format": FORMAT,
        "task": "classify",
        "labels": LABELS,
        "row_len": MAX_LEN,
        "shards": shards,
        "tokenizer": {"path": "tokenizer.model", "sha256": sha256_file(root / "tokenizer.model"), "vocab_size": VOCAB},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root / "manifest.json"


def classify_config(classify=None, model=None, **train):
    base = {
        "max_steps": 8,
        "batch_size": 16,
        "lr": 1e-2,
        "warmup_steps": 2,
        "log_interval": 1,
        "eval_interval": 1000,
        "checkpoint_every": 0,
        "device": "cpu",
    }
    return resolve_config(
        "tiny",
        None,
        {
            "task": "classify",
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, **(model or {})},
            "train": {**base, **train},
            "classify": classify or {},
        },
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_labelled_corpus(tmp_path_factory.mktemp("labelled"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    tracker = Recorder()
    cfg = classify_config(max_steps=100, lr=3e-3, eval_interval=50)
    return trainer.train(corpus, cfg, tmp_path_factory.mktemp("run"), tracker), tracker, cfg


def local_model(result, manifest_path) -> LocalModel:
    manifest = json.loads(Path(manifest_path).read_text())
    return LocalModel(
        result.weights,
        Path(manifest_path).parent / "tokenizer.model",
        result.gpt_config,
        manifest["tokenizer"]["sha256"],
        result.head,
    )


# The architecture the default recipe trains (GPTConfig's own defaults are the gpt2 recipe's).
ARCH = ModelConfig().model_dump(include={"mlp", "qk_norm", "tie_embeddings", "zero_init_proj", "logit_softcap"})


def tiny_classifier(pooling="mean", n_classes=3, **config):
    torch.manual_seed(0)
    return GPTClassifier(
        GPTConfig(**{"vocab_size": VOCAB, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, **config}),
        n_classes,
        pooling,
    ).eval()


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_logits_never_depend_on_the_padding(pooling):
    model = tiny_classifier(pooling)
    idx = torch.randint(1, VOCAB, (4, 16))
    lengths = torch.tensor([3, 16, 1, 9])
    logits, loss = model(idx, lengths)
    assert logits.shape == (4, 3) and loss is None
    repadded = idx.clone()
    for row, n in enumerate(lengths.tolist()):
        repadded[row, n:] = torch.randint(1, VOCAB, (16 - n,))
    torch.testing.assert_close(model(repadded, lengths)[0], logits, atol=1e-6, rtol=0)
    idx[0, 2] = (idx[0, 2] + 1) % VOCAB  # a real token does matter
    assert not torch.allclose(model(idx, lengths)[0][0], logits[0])


def test_mean_pools_real_positions_and_last_reads_the_final_token():
    mean, last = tiny_classifier("mean"), tiny_classifier("last")
    idx, lengths = torch.randint(1, VOCAB, (2, 16)), torch.tensor([5, 12])
    x = mean.backbone.features(idx)  # the two share weights: same seed
    expected_mean = torch.stack([x[0, :5].mean(0), x[1, :12].mean(0)])
    expected_last = torch.stack([x[0, 4], x[1, 11]])
    torch.testing.assert_close(mean(idx, lengths)[0], mean.head(expected_mean), atol=1e-6, rtol=0)
    torch.testing.assert_close(last(idx, lengths)[0], last.head(expected_last), atol=1e-6, rtol=0)


def test_class_weights_are_inverse_frequency_with_mean_one_and_change_the_loss():
    np.testing.assert_allclose(class_weights(np.array([0, 0, 0, 1]), 3), [0.5, 1.5, 0.0])
    model = tiny_classifier(n_classes=2)
    idx, lengths, targets = torch.randint(1, VOCAB, (4, 8)), torch.full((4,), 8), torch.tensor([0, 0, 0, 1])
    weight = torch.tensor([0.5, 1.5])
    logits, plain = model(idx, lengths, targets)
    _, weighted = model(idx, lengths, targets, weight)
    assert plain.dtype == torch.float32
    # Each document's loss scaled by its class weight, averaged over documents (not over weights).
    torch.testing.assert_close(weighted, (weight[targets] * F.cross_entropy(logits, targets, reduction="none")).mean())
    assert abs(weighted.item() - plain.item()) > 1e-4


def test_bad_head_arguments_name_the_fix():
    with pytest.raises(ValueError, match="n_classes must be an integer >= 2"):
        tiny_classifier(n_classes=1)
    with pytest.raises(ValueError, match="pooling must be one of"):
        tiny_classifier(pooling="max")


def test_flops_count_the_backbone_and_head_but_not_the_vocabulary_matmul():
    model = tiny_classifier(n_classes=4)
    c = model.config
    blocks = sum(p.numel() for p in model.backbone.transformer.h.parameters()) + c.n_embd  # + the final norm
    assert model.flops_per_token() == 6 * (blocks + 4 * c.n_embd + 4) + 12 * c.n_layer * c.n_embd * c.block_size


# ---------------------------------------------------------------- metrics


def test_metrics_match_a_hand_computed_confusion_matrix():
    labels = ["spam", "ham eggs", "a/b", "rare", "never"]
    actual = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    predicted = np.array([0, 0, 1, 1, 0, 2, 2, 2, 0, 0])
    matrix = confusion_matrix(actual, predicted, 5)
    assert matrix.tolist() == [[2, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 3, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    m = classification_metrics(matrix, labels)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["precision.spam"] == pytest.approx(2 / 5) and m["recall.spam"] == pytest.approx(2 / 3)
    assert m["precision.ham_eggs"] == pytest.approx(0.5) and m["recall.ham_eggs"] == pytest.approx(0.5)
    assert m["precision.a_b"] == pytest.approx(1.0) and m["recall.a_b"] == pytest.approx(3 / 4)
    assert m["precision.rare"] == 0.0 and m["recall.rare"] == 0.0
    # F1: spam 0.5, ham eggs 0.5, a/b 6/7, rare 0 (support, never predicted); never: left out.
    assert m["macro_f1"] == pytest.approx((0.5 + 0.5 + 6 / 7 + 0) / 4)
    assert metric_names(["a b", "a_b", ""]) == ["a_b", "a_b-1", "_"]


# ---------------------------------------------------------------- training and evaluation


def test_the_eval_set_spreads_over_a_val_split_grouped_by_class():
    labels = np.repeat(np.arange(7), 100)  # val rows in reading order: one class after another
    chosen = spread_rows(len(labels), 256)
    assert len(chosen) == 256 and len(set(chosen.tolist())) == 256 and list(chosen) == sorted(chosen)
    counts = np.bincount(labels[chosen], minlength=7)
    assert counts.min() >= 36 and counts.max() <= 37  # every class, in proportion
    assert list(spread_rows(5, 256)) == [0, 1, 2, 3, 4]


def test_a_content_labelled_corpus_is_learned_to_95_percent_on_val(corpus, trained):
    result, tracker, cfg = trained
    assert result.head == {"labels": LABELS, "pooling": "mean", "n_classes": 4}
    assert result.gpt_config["block_size"] == MAX_LEN
    assert tracker.series("val_accuracy_periodic") and tracker.series("val_loss_periodic")
    card = json.loads((result.weights.parent / "model.json").read_text())
    assert card["head"] == result.head and card["task"] == "classify"
    assert json.loads((result.weights.parent / "run.json").read_text())["head"] == result.head

    evaluation = evaluate(corpus, local_model(result, corpus), cfg.eval, device="cpu")
    m = evaluation.metrics
    assert m["accuracy"] >= 0.95, m
    assert m["val_rows"] == 160 and evaluation.task == "classify"
    assert evaluation.samples == [] and evaluation.generations_ok
    matrix = np.array(evaluation.confusion)
    assert matrix.sum() == 160 and m["accuracy"] == pytest.approx(np.trace(matrix) / 160)
    assert set(m) >= {"val_loss", "macro_f1", *(f"precision.{n}" for n in LABELS), *(f"recall.{n}" for n in LABELS)}


def test_evaluate_stage_writes_the_confusion_plot_and_caches_it(corpus, trained, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from tasks.evaluate.stage import evaluate_model

    result, _, cfg = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("t", artifact_location=str(tmp_path / "artifacts"))).info.run_id
    for step, value in ((1, 1.4), (2, 0.9)):  # as training would have logged them
        client.log_metric(run_id, "train_loss", value, step=step)
    first = evaluate_model.fn(corpus, result, cfg.eval, run_id)
    assert [p.name for p in first.files] == ["report.md", "confusion_matrix.png", "loss_curve.png"]
    assert first.files[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = first.files[0].read_text()
    assert "| alpha |" in text and "macro_f1" in text
    logged = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {"eval/report.md", "eval/confusion_matrix.png"} <= logged and "eval/generations.json" not in logged
    assert client.get_run(run_id).data.metrics["accuracy"] == first.metrics["accuracy"]

    again = evaluate_model.fn(corpus, result, cfg.eval, None)
    assert again.metrics == first.metrics and again.confusion == first.confusion and again.task == "classify"


def test_a_classify_run_resumes_to_identical_weights(corpus, tmp_path):
    cfg = classify_config(
        max_steps=6,
        checkpoint_every=3,
        eval_interval=2,
        model={"dropout": 0.1},
        classify={"pooling": "last", "class_weights": True},
    )
    reference = trainer.train(corpus, cfg, tmp_path / "reference")
    halfway = tmp_path / "run" / "checkpoints" / "step-00000003.pt"
    halfway.parent.mkdir(parents=True)
    halfway.write_bytes((tmp_path / "reference" / "checkpoints" / "step-00000003.pt").read_bytes())
    resumed = trainer.train(corpus, cfg, tmp_path / "run", resume=True)
    assert resumed.resumed_from == 3
    assert resumed.weights_sha256 == reference.weights_sha256 and resumed.final_loss == reference.final_loss

    other_head = classify_config(max_steps=8, model={"dropout": 0.1}, classify={"pooling": "mean"})
    with pytest.raises(TokenmillError, match="head last pooling .* vs mean pooling"):
        trainer.train(corpus, other_head, tmp_path / "run", resume=True)


def test_class_weights_change_training_on_imbalanced_labels(tmp_path):
    skewed = write_labelled_corpus(tmp_path / "skewed", n_train=64, n_val=16, label_p=[0.7, 0.1, 0.1, 0.1])
    plain, weighted = Recorder(), Recorder()
    trainer.train(skewed, classify_config(max_steps=2), tmp_path / "plain", plain)
    trainer.train(
        skewed, classify_config(max_steps=2, classify={"class_weights": True}), tmp_path / "weighted", weighted
    )
    assert plain.series("train_loss")[0] != pytest.approx(weighted.series("train_loss")[0], abs=1e-4)


@pytest.mark.e2e  # starts processes: left out of make test-fast
def test_accumulation_and_two_ranks_equal_one_big_weighted_batch(tmp_path):
    """Accumulation, two DDP ranks and two FSDP ranks all train like one batch of 8."""
    from tasks.train.launch import Topology, run_training

    skewed = write_labelled_corpus(tmp_path / "skewed", n_train=64, n_val=16, label_p=[0.7, 0.1, 0.1, 0.1])
    weighted = {"class_weights": True}
    runs = {name: Recorder() for name in ("big", "accumulated", "ddp", "fsdp")}
    big = trainer.train(
        skewed, classify_config(max_steps=3, batch_size=8, classify=weighted), tmp_path / "big", runs["big"]
    )
    others = [
        trainer.train(
            skewed,
            classify_config(max_steps=3, batch_size=4, tokens_per_step=8 * MAX_LEN, classify=weighted),
            tmp_path / "acc",
            runs["accumulated"],
        ),
        *(
            run_training(
                skewed,
                classify_config(max_steps=3, batch_size=4, parallel=mode, classify=weighted),
                tmp_path / mode,
                runs[mode],
                topology=Topology(nproc_per_node=2),
            )
            for mode in ("ddp", "fsdp")
        ),
    ]
    reference = torch.load(big.weights, weights_only=True)
    for name, other in zip(("accumulated", "ddp", "fsdp"), others):
        np.testing.assert_allclose(runs[name].series("train_loss"), runs["big"].series("train_loss"), rtol=0, atol=1e-5)
        assert other.head == big.head and other.tokens == big.tokens
        state = torch.load(other.weights, weights_only=True)
        for key, tensor in reference.items():  # Adam magnifies float noise in near-zero gradients
            torch.testing.assert_close(state[key], tensor, atol=1e-3, rtol=0)


def test_task_in_config_must_match_the_shards(corpus, tmp_path):
    with pytest.raises(TokenmillError, match="task=lm but .* holds classify shards; set task=classify"):
        trainer.train(corpus, classify_config().model_copy(update={"task": "lm"}), tmp_path / "a")
    lm = write_corpus(tmp_path / "lm")
    with pytest.raises(TokenmillError, match="task=classify but .* holds lm shards; set task=lm"):
        trainer.train(lm, classify_config(), tmp_path / "b")


# ---------------------------------------------------------------- warm start


@pytest.fixture(scope="module")
def language_model(tmp_path_factory):
    """A short LM run on the same vocabulary and tokenizer file as the labelled corpus."""
    from train_helpers import tiny_config

    root = tmp_path_factory.mktemp("lm")
    return trainer.train(write_corpus(root / "shards"), tiny_config(max_steps=3), root / "run")


def test_warm_start_from_a_language_model_loads_the_backbone(corpus, language_model):
    source = warm_start_source(language_model.weights)
    sha = source.tokenizer_sha256
    model = tiny_classifier(n_classes=4, block_size=MAX_LEN, **ARCH)  # another context length than the LM's 16
    said = warm_start(model, source, sha, {"labels": LABELS, "pooling": "mean"})
    assert "backbone from the language model" in said and "new head" in said
    assert weights_sha256(model.backbone.state_dict()) == language_model.weights_sha256
    assert torch.count_nonzero(model.head.bias) == 0  # fresh

    wider = tiny_classifier(n_classes=4, n_embd=64, **ARCH)
    with pytest.raises(TokenmillError, match=r"n_embd 32 \(source\) vs 64"):
        warm_start(wider, source, sha)


def test_training_warm_starts_a_classifier_and_says_what_it_loaded(corpus, language_model, tmp_path, capfd):
    source = warm_start_source(language_model.weights)
    result = trainer.train(
        corpus, classify_config(max_steps=1, lr=1e-9, muon_lr=1e-9, warmup_steps=0), tmp_path, warm=source
    )
    assert "backbone from the language model" in capfd.readouterr().err
    state = torch.load(result.weights, weights_only=True)
    lm = torch.load(language_model.weights, weights_only=True)
    for name, tensor in lm.items():  # one step at lr 1e-9 leaves the backbone where it started
        torch.testing.assert_close(state[f"backbone.{name}"], tensor, atol=1e-6, rtol=0)


def test_warm_start_from_another_tokenizer_is_a_clear_error(tmp_path, language_model):
    other = write_labelled_corpus(tmp_path / "other", n_train=32, n_val=8, tokenizer=b"another tokenizer")
    source = warm_start_source(language_model.weights)
    with pytest.raises(
        TokenmillError,
        match=r"trained with tokenizer \w{12}, the shards use \w{12}; "
        r"preprocess with tokenizer.reuse=.* or train from scratch",
    ):
        trainer.train(other, classify_config(max_steps=1), tmp_path / "run", warm=source)
    assert not list_checkpoints(tmp_path / "run" / "checkpoints")


def test_warm_start_from_a_classifier_keeps_the_head_only_for_the_same_labels(corpus, trained):
    result = trained[0]
    source = warm_start_source(result.weights)  # head read from model.json
    assert source.head == result.head
    same = tiny_classifier(n_classes=4, block_size=MAX_LEN, **ARCH)
    assert "backbone and head" in warm_start(same, source, source.tokenizer_sha256, result.head)
    assert weights_sha256(same.state_dict()) == result.weights_sha256

    relabelled = {"labels": ["x", "y", "z", "w"], "pooling": "mean"}
    fresh = tiny_classifier(n_classes=4, block_size=MAX_LEN, **ARCH)
    said = warm_start(fresh, source, source.tokenizer_sha256, relabelled)
    assert "backbone only" in said and "head starts fresh" in said
    assert torch.count_nonzero(fresh.head.bias) == 0
    state = torch.load(result.weights, weights_only=True)
    assert torch.equal(fresh.backbone.transformer.wte.weight, state["backbone.transformer.wte.weight"])


def test_a_language_model_cannot_warm_start_from_a_classifier(trained):
    source = warm_start_source(trained[0].weights)
    lm = GPT(GPTConfig(**{**trained[0].gpt_config}))
    with pytest.raises(TokenmillError, match="cannot warm-start .* only in the source"):
        warm_start(lm, source, source.tokenizer_sha256)


def test_a_classifier_loads_only_with_its_head(corpus, trained):
    result = trained[0]
    local = local_model(result, corpus)
    model, state = load_network(local.weights, local.gpt_config, local.head, torch.device("cpu"))
    assert weights_sha256(state) == result.weights_sha256 and not model.training
    headless = LocalModel(result.weights, local.tokenizer, result.gpt_config, local.tokenizer_sha256)
    with pytest.raises(TokenmillError, match="without a classification head"):
        evaluate(corpus, headless, EvalConfig(), device="cpu")
    assert checkpoint.describe_head(None) == "none (language model)"
