"""Training checkpoints and warm starts: what a run needs to continue exactly where it stopped.

A checkpoint is one `torch.save` of plain containers and tensors (no classes, no code), so it
loads with `torch.load(weights_only=True)`: nothing arbitrary is ever unpickled. It holds the
model, optimizer, scheduler, sampler position, every rank's RNG states, the step, the loss
and the config. Files are written atomically (`tasks.core.atomic`): a temp file renamed into
place, so a crash or SIGKILL leaves the previous checkpoints whole; only the newest
`keep` survive. Loading walks from the newest back and skips any that fail to load.

    save(ckpt_dir, payload, keep=3)
    found = load_latest(ckpt_dir)      # (path, payload) or None

A warm start loads earlier weights into a new run after checking they fit: the same
tokenizer and shapes. A classifier warm-starts its backbone from a language model (the
head starts fresh), or everything from a classifier with the same labels and pooling.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from model import GPTConfig
from tasks.core.atomic import atomic_path, write_json
from tasks.modeling.parallel import is_fsdp, unwrap
from tokenmill.errors import TokenmillError

FORMAT = "tokenmill.checkpoint/v1"
NAME = re.compile(r"^step-(\d{8})\.pt$")
# The fields that fix a model's shapes and meaning; dropout and the initialisation may differ.
SHAPE_FIELDS = (
    "vocab_size",
    "block_size",
    "n_layer",
    "n_head",
    "n_embd",
    "rope_base",
    "norm_eps",
    "mlp",
    "qk_norm",
    "tie_embeddings",
    "logit_softcap",
)
# A backbone may move to another context length: its rotary tables are derived, not stored.
BACKBONE_FIELDS = tuple(f for f in SHAPE_FIELDS if f != "block_size")
BACKBONE = "backbone."


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step-{step:08d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint files, oldest first (temp files of interrupted writes are not listed)."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [p for p in Path(ckpt_dir).iterdir() if NAME.match(p.name)]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def earlier_checkpoints(out_dir: Path, ckpt_dir: Path, resume: bool) -> list[Path]:
    """The checkpoints an earlier run left in `ckpt_dir`: fine when resuming, a user error otherwise
    (checked before anything starts, so two runs never mix their checkpoints in one out dir)."""
    earlier = list_checkpoints(ckpt_dir)
    if earlier and not resume:
        raise TokenmillError(
            f"{out_dir} already holds checkpoints of a run (up to {earlier[-1].name}); "
            f"continue it with --resume, or choose a new --out"
        )
    return earlier


def save(ckpt_dir: Path, payload: dict, keep: int) -> Path:
    """Write `payload` as the checkpoint of its step, then drop all but the newest `keep`."""
    path = checkpoint_path(ckpt_dir, payload["step"])
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
    for stale in Path(ckpt_dir).glob(".step-*.tmp"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    return path


def load(path: Path) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint")
    return payload


def load_latest(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, or None; a damaged newer file is skipped with a warning."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return path, load(path)
        except Exception as exc:  # truncated or foreign file: fall back to an older one
            warnings.warn(f"skipping unreadable checkpoint {path}: {exc}", stacklevel=2)
    return None


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order (name, dtype, shape and raw bytes of each)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- the state of a run


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng(device: torch.device, world: int) -> list[dict]:
    """Every rank's RNG states, in rank order (collective: all ranks call it)."""
    mine = rng_state(device)
    if world == 1:
        return [mine]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    return gathered


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded state dict (collective under FSDP: all ranks call it)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict()


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def restore(payload: dict, model, optimizer, scheduler, sampler, rank: int, world: int, device: torch.device) -> None:
    """Put a loaded checkpoint back into a freshly built (and parallelized) run."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, payload["model"], options=options)
        set_optimizer_state_dict(model, optimizer, payload["optimizer"], options=options)
    else:
        unwrap(model).load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    sampler.load_state_dict(payload["sampler"])
    if len(payload["rng"]) == world:
        set_rng_state(payload["rng"][rank], device)
    else:
        warnings.warn(
            f"checkpoint was written by {len(payload['rng'])} ranks, not {world}: RNG streams restart", stacklevel=2
        )


def check_compatible(payload: dict, gpt_config: dict, data_sha256: str, path: Path, head: dict | None = None) -> None:
    """Refuse to resume a checkpoint of another model shape, head or training set."""
    diffs = shape_differences(payload["gpt_config"], gpt_config)
    if payload.get("head") != head:
        diffs.append(f"head {describe_head(payload.get('head'))} (checkpoint) vs {describe_head(head)} (this run)")
    if diffs:
        raise TokenmillError(f"cannot resume from {path}: the model differs ({'; '.join(diffs)}); use a new out dir")
    if payload["data_sha256"] != data_sha256:
        raise TokenmillError(f"cannot resume from {path}: it was trained on other shards; use a new out dir")


# ---------------------------------------------------------------- warm start


@dataclass(frozen=True)
class WarmStart:
    """Weights to start from, with what is needed to check they fit: shapes and tokenizer."""

    weights: Path
    gpt_config: dict
    tokenizer_sha256: str
    head: dict | None = None  # a classifier's {"labels", "pooling", ...}; None for a language model


MODEL_CARD = "model.json"


def write_model_card(out_dir: Path, gpt_config: dict, tokenizer_sha256: str, **extra) -> Path:
    """`model.json` beside `model.pt`: what a later warm start needs to check the fit."""
    path = Path(out_dir) / MODEL_CARD
    write_json(path, {"gpt": gpt_config, "tokenizer_sha256": tokenizer_sha256, **extra})
    return path


def write_run_record(out_dir: Path, **fields) -> Path:
    """`run.json`, written as a run (or a resumed attempt) starts: what it will train, from what,
    with which code, so the run can be reproduced without a tracking server."""
    import platform

    import tokenmill
    from tasks.core.provenance import git_commit

    code = {
        "tokenmill": tokenmill.__version__,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    path = Path(out_dir) / "run.json"
    write_json(path, {**fields, "code": code})
    return path


def warm_start_source(
    weights: Path, gpt_config: dict | None = None, tokenizer_sha256: str | None = None, head: dict | None = None
) -> WarmStart:
    """A WarmStart from a weights file; what is not given is read from `model.json` (or the
    registry's `config.json`) beside it."""
    weights = Path(weights)
    if not weights.is_file():
        raise TokenmillError(f"warm-start weights not found: {weights}; pass the model.pt of a finished run")
    card = next((weights.with_name(n) for n in (MODEL_CARD, "config.json") if weights.with_name(n).is_file()), None)
    if gpt_config is None or tokenizer_sha256 is None or head is None:
        meta = json.loads(card.read_text()) if card else {}
        gpt_config = gpt_config if gpt_config is not None else meta.get("gpt")
        tokenizer_sha256 = tokenizer_sha256 or meta.get("tokenizer_sha256")
        head = head if head is not None else meta.get("head")
    if gpt_config is None or not tokenizer_sha256:
        raise TokenmillError(
            f"cannot check {weights} for a warm start: no {MODEL_CARD} beside it; "
            f"pass its gpt_config and tokenizer sha256 (--init-tokenizer-sha256)"
        )
    return WarmStart(weights, dict(gpt_config), tokenizer_sha256, head)


def shape_differences(source: dict, target: dict) -> list[str]:
    """SHAPE_FIELDS that differ; a field a gpt_config lacks (recorded before it existed) has
    GPTConfig's default, which is what that model computes."""
    defaults = GPTConfig.__dataclass_fields__
    source = {name: defaults[name].default for name in SHAPE_FIELDS} | source
    target = {name: defaults[name].default for name in SHAPE_FIELDS} | target
    return [
        f"{name} {source.get(name)} (source) vs {target.get(name)} (this run)"
        for name in SHAPE_FIELDS
        if source.get(name) != target.get(name)
    ]


def warm_start(model: torch.nn.Module, source: WarmStart, tokenizer_sha256: str, head: dict | None = None) -> str:
    """Load `source` into `model` when tokenizer, vocab and shapes match, else a TokenmillError
    that names every difference. Returns one line saying what was loaded.

    `head` is the run's classifier head ({"labels", "pooling", ...}) when `model` is a
    classifier; see `warm_start_classifier`.
    """
    if hasattr(model, "backbone"):
        return warm_start_classifier(model, source, tokenizer_sha256, head)
    target = {name: getattr(model.config, name) for name in SHAPE_FIELDS}
    diffs = shape_differences(source.gpt_config, target)
    if source.tokenizer_sha256 != tokenizer_sha256:
        diffs.insert(0, f"tokenizer {source.tokenizer_sha256[:12]} (source) vs {tokenizer_sha256[:12]} (this run)")
    state = torch.load(source.weights, map_location="cpu", weights_only=True) if not diffs else {}
    diffs += state_differences(state, model.state_dict()) if state else []
    if diffs:
        raise TokenmillError(
            f"cannot warm-start from {source.weights}: {'; '.join(diffs[:6])}; "
            f"start from a model with the same tokenizer, shapes and architecture (a model of the gpt2 "
            f"recipe needs --set recipe=gpt2), or train from scratch"
        )
    model.load_state_dict(state)
    return f"warm start: all weights from {source.weights}"


def state_differences(source: dict, own: dict) -> list[str]:
    """Tensors only one side has, or of another shape: the weights themselves, in case a card is wrong."""
    diffs = []
    for name in sorted(set(own) | set(source)):
        if name not in source or name not in own:
            diffs.append(f"{name} only in the {'source' if name in source else 'new model'}")
        elif source[name].shape != own[name].shape:
            diffs.append(f"{name} {tuple(source[name].shape)} (source) vs {tuple(own[name].shape)} (this run)")
    return diffs


def describe_head(head: dict | None) -> str:
    if head is None:
        return "none (language model)"
    return f"{head.get('pooling')} pooling over labels {list(head.get('labels', []))}"


def split_classifier_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(backbone state with GPT's own keys, head state) of a classifier's or an LM's weights."""
    if not any(k.startswith(BACKBONE) for k in state):  # a language model: all backbone
        return dict(state), {}
    backbone = {k[len(BACKBONE) :]: v for k, v in state.items() if k.startswith(BACKBONE)}
    return backbone, {k: v for k, v in state.items() if not k.startswith(BACKBONE)}


def warm_start_classifier(model: torch.nn.Module, source: WarmStart, tokenizer_sha256: str, head: dict | None) -> str:
    """Warm-start a GPTClassifier: its backbone from a language model or a classifier (same
    tokenizer and backbone shapes required; the context length may differ), and its head too
    when the source is a classifier with the same labels and pooling; else the head stays fresh."""
    if source.tokenizer_sha256 != tokenizer_sha256:
        raise TokenmillError(
            f"cannot warm-start from {source.weights}: it was trained with tokenizer {source.tokenizer_sha256[:12]}, "
            f"the shards use {tokenizer_sha256[:12]}; preprocess with tokenizer.reuse=<the source model's "
            f"tokenizer.model> or train from scratch"
        )
    target = {name: getattr(model.config, name) for name in BACKBONE_FIELDS}
    diffs = [d for d in shape_differences(source.gpt_config, target) if not d.startswith("block_size ")]
    state = torch.load(source.weights, map_location="cpu", weights_only=True) if not diffs else {}
    backbone, head_state = split_classifier_state(state)
    diffs += state_differences(backbone, model.backbone.state_dict()) if state else []
    if diffs:
        raise TokenmillError(
            f"cannot warm-start from {source.weights}: {'; '.join(diffs[:6])}; "
            f"start from a model with the same backbone shapes (n_layer, n_head, n_embd) or train from scratch"
        )
    model.backbone.load_state_dict(backbone)
    if not head_state:
        return f"warm start: backbone from the language model {source.weights}; new head for {model.n_classes} classes"
    return load_head(model, source, head_state, head)


def load_head(model: torch.nn.Module, source: WarmStart, head_state: dict, head: dict | None) -> str:
    """Take a source classifier's head only for the same labels and pooling (the scheduled retrain)."""
    source_head = {k[len("head.") :]: v for k, v in head_state.items() if k.startswith("head.")}
    fits = {k: v.shape for k, v in source_head.items()} == {k: v.shape for k, v in model.head.state_dict().items()}
    same = (
        source.head is not None
        and head is not None
        and list(source.head.get("labels", [])) == list(head["labels"])
        and source.head.get("pooling") == head.get("pooling")
    )
    if same and fits:
        model.head.load_state_dict(source_head)
        return f"warm start: backbone and head from the classifier {source.weights} (same labels)"
    return (
        f"warm start: backbone only from the classifier {source.weights}; it has {describe_head(source.head)}, "
        f"this run {describe_head(head)}, so the head starts fresh"
    )
