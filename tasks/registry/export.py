"""Export a registered language model as a Hugging Face checkpoint that stock transformers loads.

    tokenmill export models:/tokenmill-lm@champion ./tokenmill-lm-hf --format hf

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("./tokenmill-lm-hf")     # no trust_remote_code

The network. `model/gpt.py` is a Llama-style decoder (RMSNorm pre-norm, rotate-half rotary
embeddings, no biases) with a non-gated MLP, c_fc -> act -> c_proj. Two stock transformers
architectures are exactly that, and the weights are only renamed (c_attn is cut into q, k and v:
its rows are [q; k; v], each head-major):

- without qk_norm, Arcee: Llama's attention and norms with an MLP up_proj -> act -> down_proj;
- with qk_norm, Apertus: the same, plus an RMSNorm over each head's q and k before the rotary
  embedding, as ours; its pre-norms are called attention_layernorm and feedforward_layernorm.

hidden_act is the MLP's activation under the name transformers gives it: "gelu" (exact erf, as
F.gelu) or "relu2" (ReLU squared). An untied head is written as lm_head.weight with
tie_word_embeddings false. A gpt_config recorded before these options existed lacks their keys;
GPTConfig's defaults fill them in (GELU, no qk_norm, tied), which is what that model computes.

The tokenizer. The SentencePiece BPE model becomes a `tokenizers` BPE model whose merges replay
SentencePiece's: two adjacent pieces merge when their concatenation is a piece, the highest
scoring first. Text is Unicode-normalized as the training data was (the run's manifest says
how), spaces become U+2581, and characters outside the vocabulary fall back to bytes.

A classifier is refused: no stock transformers class pools and scores as GPTClassifier does. So
is a model trained with logit_softcap > 0: no stock architecture of this shape soft-caps logits.
Everything is checked before anything is written (the weights against their registered sha256,
the tokenizer against config.json's); files go to a temporary directory beside OUT_DIR that is
renamed into place at the end. This module does not import transformers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model import GPTConfig
from tasks.core.atomic import UMASK, sha256_file, write_json
from tokenmill.credentials import raise_refusal
from tokenmill.errors import TokenmillError

if TYPE_CHECKING:
    from tasks.modeling.local_model import LocalModel

ARCEE, APERTUS = "ArceeForCausalLM", "ApertusForCausalLM"
MODEL_TYPES = {ARCEE: "arcee", APERTUS: "apertus"}
SPACE = "\u2581"  # SentencePiece's visible space
NORMALIZATIONS = ("none", "NFC", "NFKC")
TOP_RENAMES = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight"}
# GPT parameter -> the architecture's parameter inside block i; c_attn is split apart in hf_state_dict.
SHARED_RENAMES = {
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.c_fc.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
BLOCK_RENAMES = {
    ARCEE: {
        "ln_1.weight": "input_layernorm.weight",
        "ln_2.weight": "post_attention_layernorm.weight",
        **SHARED_RENAMES,
    },
    APERTUS: {
        "ln_1.weight": "attention_layernorm.weight",
        "ln_2.weight": "feedforward_layernorm.weight",
        "attn.q_norm.weight": "self_attn.q_norm.weight",
        "attn.k_norm.weight": "self_attn.k_norm.weight",
        **SHARED_RENAMES,
    },
}
BLOCK_KEY = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")


# ---------------------------------------------------------------- the network


def architecture(cfg: GPTConfig) -> str:
    """The stock transformers class that computes what GPT(cfg) does; a TokenmillError if none does."""
    if cfg.logit_softcap:
        raise TokenmillError(
            f"the model soft-caps its logits (logit_softcap={cfg.logit_softcap}) and no stock transformers "
            f"architecture of its shape does, so an export would change its outputs; train with "
            f"model.logit_softcap=0 to export it"
        )
    return APERTUS if cfg.qk_norm else ARCEE


def hf_config(gpt_config: dict, eos_id: int = 1, dtype: str = "float32") -> dict:
    """config.json of the Arcee or Apertus model that computes what GPT(GPTConfig(**gpt_config)) does."""
    cfg = GPTConfig(**gpt_config)
    arch = architecture(cfg)
    config = {
        "architectures": [arch],
        "model_type": MODEL_TYPES[arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": 4 * cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "head_dim": cfg.n_embd // cfg.n_head,
        "hidden_act": cfg.mlp,  # "gelu" and "relu2" are transformers' names (ACT2FN) too
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "rope_theta": cfg.rope_base,  # the transformers 4.x spelling; 5.x folds it into rope_parameters
        "rope_scaling": None,  # 4.x again: Apertus would default to llama3 scaling; 5.x ignores a null
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        # Each written out: the tokenizer has no BOS piece, and Apertus's defaults are its own ids.
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "dtype": dtype,
        "use_cache": True,
    }
    if arch == ARCEE:
        config["mlp_bias"] = False  # Apertus has no such field: its MLP never has biases
    return config


def generation_config(eos_id: int, block_size: int) -> dict:
    """Stop at end-of-document; by default stay within the context the model was trained on."""
    return {"eos_token_id": eos_id, "pad_token_id": eos_id, "max_length": block_size}


def hf_state_dict(state: dict[str, torch.Tensor], gpt_config: dict) -> dict[str, torch.Tensor]:
    """GPT's state dict under its architecture's names: separate, contiguous tensors, a tied head left out."""
    if any(name.startswith("backbone.") for name in state):
        raise TokenmillError("these are a classifier's weights; only a language model exports to Hugging Face")
    cfg = GPTConfig(**gpt_config)
    renames = BLOCK_RENAMES[architecture(cfg)]
    out, unknown = {}, []
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        block = BLOCK_KEY.match(name)
        if name == "lm_head.weight" and not cfg.tie_embeddings:
            out[name] = tensor
        elif name == "lm_head.weight":
            if not torch.equal(tensor, state.get("transformer.wte.weight", tensor)):
                raise TokenmillError(
                    "lm_head.weight differs from the token embedding, but the model's gpt_config says "
                    "tie_embeddings=true; the export would drop the head"
                )
        elif block and block.group(2) == "attn.c_attn.weight":
            prefix = f"model.layers.{block.group(1)}.self_attn."
            for part, rows in zip("qkv", tensor.chunk(3, dim=0)):  # (3C, C): rows [q; k; v]
                out[f"{prefix}{part}_proj.weight"] = rows
        elif block and block.group(2) in renames:
            out[f"model.layers.{block.group(1)}.{renames[block.group(2)]}"] = tensor
        elif name in TOP_RENAMES:
            out[TOP_RENAMES[name]] = tensor
        else:
            unknown.append(name)
    expected = expected_hf_keys(cfg)
    missing = sorted(set(expected) - set(out))
    unknown += sorted(set(out) - set(expected))  # blocks beyond n_layer
    if unknown or missing:
        raise TokenmillError(
            f"these weights are not those of the GPT their gpt_config describes "
            f"(unexpected {unknown[:3]}, missing {missing[:3]})"
        )
    # safetensors refuses tensors that share storage, as q, k and v views of c_attn would.
    return {name: tensor.contiguous().clone() for name, tensor in out.items()}


def expected_hf_keys(cfg: GPTConfig) -> list[str]:
    keys = [*TOP_RENAMES.values(), *([] if cfg.tie_embeddings else ["lm_head.weight"])]
    for i in range(cfg.n_layer):
        keys += [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkv"]
        keys += [f"model.layers.{i}.{name}" for name in BLOCK_RENAMES[architecture(cfg)].values()]
    return keys


# ---------------------------------------------------------------- the tokenizer


def spm_proto(model_bytes: bytes):
    """The parsed SentencePiece model, if it is one that converts exactly; else a TokenmillError."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if spec.model_type != spec.BPE:
        problems.append(
            f"model type {spec.ModelType.Name(spec.model_type).lower()} (only BPE replays exactly as merges)"
        )
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        problems.append(f"normalization rule {norm.name!r} (only identity)")
    if norm.add_dummy_prefix or norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        problems.append("whitespace handling other than tokenmill's (no dummy prefix, spaces kept and escaped)")
    if spec.treat_whitespace_as_suffix:
        problems.append("whitespace as suffix")
    if any(p.type == p.USER_DEFINED for p in proto.pieces):
        problems.append("user-defined symbols")
    if problems:
        raise TokenmillError(
            f"the tokenizer does not convert exactly to tokenizer.json: {'; '.join(problems)}; "
            f"export needs a tokenizer trained by tokenmill with tokenizer.model_type=bpe"
        )
    return proto


def spm_merges(proto) -> list[tuple[str, str]]:
    """BPE merges that replay SentencePiece's encoding: for every normal piece, each split into two
    normal pieces, the highest-scoring (earliest learned) pieces first. Byte and control pieces
    are never formed by merging, as in SentencePiece."""
    normal = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == p.NORMAL}
    ranked = []
    for piece, i in normal.items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal]
        splits.sort(key=lambda pair: (normal[pair[0]], normal[pair[1]]))
        ranked += [(-proto.pieces[i].score, left, right) for left, right in splits]
    ranked.sort(key=lambda merge: merge[0])  # stable: splits of one piece keep their order
    return [(left, right) for _, left, right in ranked]


def bpe_tokenizer(proto, normalize: str):
    """A `tokenizers.Tokenizer` that encodes raw text to the ids SentencePiece gives the
    `normalize`-normalized text, and decodes ids back to that text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    spec = proto.trainer_spec
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = proto.pieces[spec.unk_id].piece
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab, merges=spm_merges(proto), unk_token=unk, byte_fallback=spec.byte_fallback, fuse_unk=True
        )
    )  # SentencePiece fuses unknowns
    unicode = {"NFC": [normalizers.NFC()], "NFKC": [normalizers.NFKC()]}.get(normalize, [])
    tokenizer.normalizer = normalizers.Sequence([*unicode, normalizers.Replace(" ", SPACE)])
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    special = [p.piece for p in proto.pieces if p.type in (p.CONTROL, p.UNKNOWN)]
    tokenizer.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in special])
    return tokenizer


def tokenizer_config(proto, model_max_length: int) -> dict:
    """tokenizer_config.json: the generic fast tokenizer (a model-specific class would rebuild
    its own pipeline), no BOS, and special tokens typed in text read as text, as SentencePiece does."""
    spec = proto.trainer_spec
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": proto.pieces[spec.eos_id].piece if spec.eos_id >= 0 else None,
        "unk_token": proto.pieces[spec.unk_id].piece,
        "pad_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }


def write_tokenizer(model_bytes: bytes, out_dir: Path, normalize: str, model_max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json, which `AutoTokenizer.from_pretrained(out_dir)` loads."""
    if normalize not in NORMALIZATIONS:
        raise TokenmillError(f"unknown text normalization {normalize!r}; expected one of {NORMALIZATIONS}")
    proto = spm_proto(model_bytes)
    bpe_tokenizer(proto, normalize).save(str(Path(out_dir) / "tokenizer.json"))
    write_json(Path(out_dir) / "tokenizer_config.json", tokenizer_config(proto, model_max_length))


# ---------------------------------------------------------------- the checkpoint


def write_hf(
    out_dir: Path, state: dict[str, torch.Tensor], gpt_config: dict, tokenizer_model: bytes, normalize: str
) -> None:
    """Write the Hugging Face checkpoint of a GPT's weights and SentencePiece model into out_dir."""
    eos_id = spm_proto(tokenizer_model).trainer_spec.eos_id
    write_model(out_dir, state, gpt_config, eos_id)
    write_tokenizer(tokenizer_model, out_dir, normalize, GPTConfig(**gpt_config).block_size)


def write_model(out_dir: Path, state: dict[str, torch.Tensor], gpt_config: dict, eos_id: int) -> None:
    """model.safetensors, config.json and generation_config.json, which
    `AutoModelForCausalLM.from_pretrained(out_dir)` loads; nothing is written if the GPT does not export."""
    from safetensors.torch import save_file

    tensors = hf_state_dict(state, gpt_config)
    dtype = str(tensors["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    config = hf_config(gpt_config, eos_id, dtype)
    save_file(tensors, str(Path(out_dir) / "model.safetensors"), metadata={"format": "pt"})
    write_json(Path(out_dir) / "config.json", config)
    write_json(Path(out_dir) / "generation_config.json", generation_config(eos_id, config["max_position_embeddings"]))


def export_hf(model_uri: str, out_dir: Path) -> Path:
    """Verify the registered language model `model_uri` and write it to `out_dir` as a Hugging
    Face checkpoint; on any error nothing is written."""
    from tasks.registry.model_store import download_model
    from tasks.registry.versions import registered_version

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise TokenmillError(f"{out_dir} exists and is not empty; choose a new OUT_DIR or empty it")
    version = registered_version(model_uri)
    with tempfile.TemporaryDirectory(prefix="tokenmill-export-") as tmp:
        local = download_model(model_uri, Path(tmp) / "model")
        if local.head is not None:
            raise TokenmillError(classifier_refusal(model_uri, local.head))
        architecture(GPTConfig(**local.gpt_config))  # refuses a network no stock class computes
        state = torch.load(local.weights, map_location="cpu", weights_only=True)
        verify(model_uri, local, state, version.tags.get("weights_sha256"))
        logged = json.loads(local.weights.with_name("config.json").read_text()).get("normalize")
        normalize = logged or training_normalization(model_uri, version.run_id, Path(tmp) / "run")
        with staging_dir(out_dir) as stage:
            write_hf(stage, state, local.gpt_config, local.tokenizer.read_bytes(), normalize)
    return out_dir


def classifier_refusal(model_uri: str, head: dict) -> str:
    return (
        f"{model_uri} is a classifier ({head.get('pooling', 'mean')} pooling, linear head with a bias) and no stock "
        f"transformers class computes that: *ForSequenceClassification scores the last non-pad token with a "
        f"bias-free layer; serve it with mlflow.pyfunc.load_model instead"
    )


def verify(model_uri: str, local: LocalModel, state: dict[str, torch.Tensor], tagged_sha256: str | None) -> None:
    """The weights against every sha256 recorded for them, the tokenizer against config.json's."""
    from tasks.modeling.checkpoint import weights_sha256

    card = local.weights.with_name("config.json")  # the logged config, beside the weights
    logged = json.loads(card.read_text()).get("weights_sha256") if card.is_file() else None
    recorded = {"the version tag weights_sha256": tagged_sha256, "the logged config.json": logged}
    if not any(recorded.values()):
        raise TokenmillError(f"{model_uri} records no weights sha256 to check its weights against; re-register it")
    actual = weights_sha256(state)
    for where, expected in recorded.items():
        if expected and expected != actual:
            raise TokenmillError(
                f"the weights of {model_uri} have sha256 {actual[:12]}, not {expected[:12]} as "
                f"{where} records; the artifact is damaged or was replaced"
            )
    tokenizer_sha = sha256_file(local.tokenizer)
    if tokenizer_sha != local.tokenizer_sha256:
        raise TokenmillError(
            f"the tokenizer of {model_uri} has sha256 {tokenizer_sha[:12]}, not "
            f"{local.tokenizer_sha256[:12]} as its config.json records; the artifact is damaged"
        )


def training_normalization(model_uri: str, run_id: str | None, dst: Path) -> str:
    """How the training text was Unicode-normalized, for a model whose config.json does not say:
    data.normalize in the manifest logged with the run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="data/manifest.json", dst_path=str(dst))
        manifest = json.loads(Path(path).read_text())
    except (MlflowException, OSError, ValueError, TypeError) as exc:
        raise_refusal(exc)
        raise TokenmillError(
            f"cannot tell how the training text of {model_uri} was normalized: its run {run_id} "
            f"has no readable data/manifest.json"
        ) from None
    return manifest.get("config", {}).get("data", {}).get("normalize", "none")


@contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary directory beside out_dir, renamed onto it when the block succeeds, else removed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield stage
        os.chmod(stage, 0o777 & ~UMASK)  # mkdtemp makes 0700; readers may be other users
        try:
            os.replace(stage, out_dir)  # onto a missing or empty directory
        except OSError as exc:
            raise TokenmillError(
                f"cannot move the export into {out_dir}: {exc.strerror}; choose a new OUT_DIR"
            ) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
