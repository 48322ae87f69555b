"""The typed config tree of a run, its named presets, and how they combine.

Precedence, lowest first: field defaults < recipe < preset < catalog entry < overrides (CLI
`--set`, `--max-steps`, or flow parameters). `resolve_config` applies exactly that order.

The field defaults are the modern recipe (`recipe: modern`). `recipe: gpt2` layers the
settings of tokenmill's first recipe over them (presets.yaml, `recipes:`), so older
configs reproduce and the two can be compared; the preset, the catalog entry and the
overrides still win over either.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tokenmill.data_quality import NearDupConfig, QualityConfig
from tokenmill.errors import TokenmillError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenizerConfig(Section):
    model_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = Field(4096, ge=320, le=1 << 20)
    byte_fallback: bool = True
    character_coverage: float = Field(0.9995, gt=0.0, le=1.0)
    sample_bytes: int = Field(8_000_000, gt=0, description="text read to train the tokenizer")
    reuse: str | None = Field(
        None,
        description="reuse a tokenizer instead of training one: a tokenizer.model file, a shards "
        "directory or manifest.json, or the catalog name of a corpus already preprocessed",
    )


class DataConfig(Section):
    context_len: int = Field(256, ge=8, description="tokens a model sees; rows hold one more")
    val_fraction: float = Field(0.02, gt=0.0, lt=1.0)
    seed: int = 1337
    normalize: Literal["none", "NFC", "NFKC"] = "NFC"
    min_chars: int = Field(1, ge=0)
    max_chars: int = Field(2_000_000, gt=0)
    partition_bytes: int = Field(4_000_000, gt=0, description="text per Dask partition")
    on_decode_error: Literal["replace", "drop"] = Field(
        "replace", description="a document with bytes that are not UTF-8: keep it with U+FFFD, or drop it"
    )
    on_bad_record: Literal["skip", "fail"] = Field(
        "skip", description="a malformed JSON line or a record without the text field: count and skip, or stop"
    )
    incremental: bool = Field(
        True, description="reuse an earlier build's tokenizer and unchanged partitions of the same corpus"
    )
    near_dup: NearDupConfig = Field(
        NearDupConfig(), description="MinHash near-duplicate removal across the corpus (tokenmill/data_quality.py)"
    )
    quality: QualityConfig = Field(
        QualityConfig(), description="document filters: a preset (none, code, prose) and per-filter settings"
    )
    drop_sample: int = Field(
        20, ge=0, le=1000, description="dropped documents kept per reason, seeded, in <shards>/dropped/<reason>.jsonl"
    )

    @model_validator(mode="after")
    def _bounds(self) -> DataConfig:
        if self.min_chars > self.max_chars:
            raise ValueError("min_chars must not exceed max_chars")
        return self


class ModelConfig(Section):
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_embd: int = Field(128, ge=8)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    mlp: Literal["relu2", "gelu"] = Field("relu2", description="the MLP's activation: ReLU squared, or GELU (gpt2)")
    qk_norm: bool = Field(True, description="RMS-normalise each head's q and k before attention")
    tie_embeddings: bool = Field(True, description="one matrix embeds tokens and scores them")
    zero_init_proj: bool = Field(False, description="blocks' output projections start at zero")
    logit_softcap: float = Field(
        0.0, ge=0.0, description="> 0: logits = c * tanh(logits / c); no stock HF architecture has it (no export)"
    )

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError("n_embd / n_head must be an even integer (rotary embeddings)")
        return self


class TrainConfig(Section):
    max_steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1, description="rows per micro-batch")
    grad_accum: int = Field(1, ge=1)
    optimizer: Literal["muon", "adamw"] = Field(
        "muon", description="muon: Muon for the blocks' matrices, AdamW for the rest; adamw: AdamW for all"
    )
    lr: float = Field(3e-3, gt=0.0, description="AdamW's learning rate (with muon: embedding, head, gains)")
    muon_lr: float = Field(0.01, gt=0.0, description="Muon's learning rate for the blocks' matrices")
    muon_momentum: float = Field(0.95, ge=0.0, lt=1.0)
    schedule: Literal["wsd", "cosine"] = Field(
        "wsd", description="wsd: warmup, constant, linear decay over decay_fraction; cosine: warmup, cosine"
    )
    decay_fraction: float = Field(0.4, gt=0.0, le=1.0, description="wsd: the share of steps that decay the LR")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="the LR at the last step, as a share of lr")
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = Field(1.0, ge=0.0, description="0 disables clipping")
    eval_interval: int = Field(100, ge=1)
    eval_batches: int = Field(8, ge=1, description="val batches per periodic eval")
    log_interval: int = Field(10, ge=1)
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    seed: int = 1337
    tokens_per_step: int | None = Field(
        None, ge=1, description="tokens per optimizer step; sets grad_accum from batch_size, context and ranks"
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 elsewhere"
    )
    compile: bool = Field(False, description="torch.compile the model")
    checkpoint_every: int = Field(100, ge=0, description="steps between checkpoints; 0: only at the end")
    keep_checkpoints: int = Field(3, ge=1, description="newest checkpoints kept on disk")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="how several ranks share the model")
    nproc_per_node: int = Field(1, ge=1, description="ranks on this machine; > 1 launches torchrun")
    peak_flops: float | None = Field(
        None, gt=0, description="peak FLOP/s of one device for MFU; default: a table of GPUs"
    )
    budget_s: float | None = Field(
        None,
        gt=0,
        description="seconds of training: a throughput probe then picks depth, width, lr and max_steps "
        "(tasks/train/budget.py); the configured shapes and max_steps are then ignored",
    )
    tokens_per_param: float = Field(
        1.0, gt=0, description="with budget_s: training tokens per parameter to aim for (measured: BENCHMARKS.md)"
    )

    @model_validator(mode="after")
    def _one_batch_size(self) -> TrainConfig:
        if self.tokens_per_step is not None and self.grad_accum != 1:
            raise ValueError(
                "set train.tokens_per_step or train.grad_accum, not both (tokens_per_step derives grad_accum)"
            )
        return self


class EvalConfig(Section):
    max_rows: int = Field(2048, ge=1, description="val rows in the frozen eval set")
    batch_size: int = Field(32, ge=1)
    prompts: list[str] = Field(
        ["def ", "class ", "import ", "The ", "# "], min_length=1, description="fixed prompts for sample generations"
    )
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.8, ge=0.0)
    top_k: int = Field(50, ge=1)
    seed: int = 1337


class ClassifyConfig(Section):
    """Settings of the text-classification task (`task: classify`)."""

    max_len: int = Field(128, ge=8, description="tokens kept per document; longer ones are truncated")
    pooling: Literal["mean", "last"] = Field(
        "mean", description="how token states become one vector: mean over the document's tokens, or its last token"
    )
    class_weights: bool = Field(False, description="weight the loss by inverse class frequency (imbalanced labels)")


DEFAULT_MODEL_NAMES = {"lm": "tokenmill-lm", "classify": "tokenmill-classifier"}


class RegistryConfig(Section):
    model_name: str = Field(
        "", description="registered model; default tokenmill-lm, or tokenmill-classifier for classify"
    )
    experiment: str = Field("tokenmill", min_length=1)
    min_improvement: float = Field(
        0.005, ge=0.0, description="relative gain in the gate metric (val_bpb for lm, macro_f1 for classify) to promote"
    )


class RunConfig(Section):
    preset: str = "default"
    recipe: Literal["modern", "gpt2"] = Field(
        "modern", description="modern: Muon, QK-norm, ReLU², zero-init projections, WSD; gpt2: the first recipe"
    )
    task: Literal["lm", "classify"] = Field(
        "lm", description="lm: next-token language model; classify: text classifier"
    )
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()
    classify: ClassifyConfig = ClassifyConfig()

    @model_validator(mode="after")
    def _model_name(self) -> RunConfig:
        if not self.registry.model_name:  # the task decides the default registered model
            registry = self.registry.model_copy(update={"model_name": DEFAULT_MODEL_NAMES[self.task]})
            object.__setattr__(self, "registry", registry)
        return self


def load_presets_file() -> dict[str, Any]:
    text = resources.files("tokenmill").joinpath("presets.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def load_presets() -> dict[str, dict[str, Any]]:
    return {name: layer for name, layer in load_presets_file().items() if name != "recipes"}


def load_recipes() -> dict[str, dict[str, Any]]:
    return load_presets_file()["recipes"]


def preset_names() -> list[str]:
    return sorted(load_presets())


def resolve_config(
    preset: str = "default",
    catalog_overrides: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Merge defaults < recipe < preset < catalog entry < overrides into one validated RunConfig.

    The recipe is the one the higher layers name (the last of them that sets `recipe`). A preset
    may hold settings for one recipe under that recipe's name (e.g. `gpt2: {train: {lr: ...}}`),
    layered right above the preset when that recipe is the one in use."""
    presets, recipes = load_presets(), load_recipes()
    if preset not in presets:
        raise TokenmillError(f"unknown preset '{preset}': choose one of {', '.join(sorted(presets))}")
    preset_layer = {k: v for k, v in (presets[preset] or {}).items() if k not in recipes}
    layers = (preset_layer, catalog_overrides or {}, overrides or {})
    recipe = next((layer["recipe"] for layer in reversed(layers) if "recipe" in layer), "modern")
    if recipe not in recipes:
        raise TokenmillError(f"unknown recipe {recipe!r}: choose one of {', '.join(recipes)}")
    merged: dict[str, Any] = {"preset": preset}
    for layer in (recipes[recipe] or {}, preset_layer, (presets[preset] or {}).get(recipe) or {}, *layers[1:]):
        merged = deep_merge(merged, layer)
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        raise TokenmillError(f"invalid config: {describe_validation_error(exc)}") from None


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """Turn ["train.lr=1e-3", "model.n_layer=6"] into a nested override dict."""
    nested: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TokenmillError(f"bad --set '{item}': write SECTION.FIELD=VALUE, e.g. train.lr=1e-3")
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TokenmillError(f"bad --set '{item}': '{part}' was already set to a value, not a section")
        node[leaf] = parse_value(raw)
    return nested


def parse_value(raw: str) -> Any:
    """A --set value: int, then float (so 1e-3 and 1e6 are numbers), null (None), booleans, YAML
    lists and maps, else the string."""
    text = raw.strip()
    if text.lower() in ("null", "~"):  # not "none": data.normalize=none is a string value
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.startswith(("[", "{")):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            pass
    return text


def parse_duration(text: str) -> float:
    """Seconds of "90", "90s", "10m", "1h", "1h30m" or "2.5m"; a clear error otherwise."""
    raw = str(text).strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms]?)", raw)
    if not raw or not parts or "".join(n + u for n, u in parts) != raw.replace(" ", ""):
        raise TokenmillError(f"bad budget {text!r}: write seconds or a duration such as 90s, 10m or 1h30m")
    seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1, "": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise TokenmillError(f"bad budget {text!r}: it must be more than zero seconds")
    return seconds


def deep_merge(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field; check the spelling"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)
