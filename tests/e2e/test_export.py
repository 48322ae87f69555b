"""`tokenmill export --format hf`: stock transformers loads the checkpoint and computes what tokenmill does.

A tiny GPT of the default recipe's network (QK-norm, ReLU squared: an ApertusForCausalLM) with
random weights (norm gains too, and a non-default rotary base) and a real SentencePiece model
trained here on Python source; transformers is a dev dependency. Each architecture the export
writes is checked on its own in tests/registry/test_export_architectures.py.
"""

import json
import sysconfig
import unicodedata
from pathlib import Path

import pytest
import torch

from model import GPT, GPTClassifier, GPTConfig
from tasks.core.tokenizer import load_tokenizer as load
from tasks.modeling.checkpoint import weights_sha256
from tasks.preprocess.tokenizer import chunk_lines, train_sentencepiece
from tasks.registry.export import write_hf, write_tokenizer
from tokenmill.config import ModelConfig
from tokenmill.errors import TokenmillError

transformers = pytest.importorskip("transformers")

SOURCES = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
TRAIN_FILES, HELD_OUT = SOURCES[:30], SOURCES[-12:]
# Whitespace runs, tabs, CRLF, digits, code, a decomposed é (NFC composes it), characters outside
# the vocabulary (emoji, CJK: byte fallback), and text that looks like special pieces.
TRICKY = (
    "def f(x):\n\tif x  >  10:   return 'naïve cafe\u0301 ℌ'\r\n\n\n        # 1234567890 3.14\n"
    "😀 中文字符 \t\t  </s> <unk> <0x41>  "
)
# The network the default recipe trains.
ARCH = ModelConfig().model_dump(include={"mlp", "qk_norm", "tie_embeddings", "zero_init_proj", "logit_softcap"})
FILES = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}


def sentences(limit: int = 400_000):
    taken = 0
    for path in TRAIN_FILES:
        for chunk in chunk_lines(path.read_text(errors="replace"), 2000):
            yield chunk
            taken += len(chunk)
            if taken >= limit:
                return


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    return train_sentencepiece(sentences(), vocab_size=600, num_threads=1)


def random_gpt(vocab_size: int, seed: int = 0, **arch) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=vocab_size,
        block_size=128,
        n_layer=2,
        n_head=4,
        n_embd=64,
        rope_base=5000.0,
        norm_eps=1e-6,
        **(ARCH | arch),
    )
    gpt = GPT(config).eval()
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            gain = name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "q_norm.weight", "k_norm.weight"))
            p.normal_(1.0, 0.2) if gain else p.normal_(0.0, 0.1)
    return gpt


@pytest.fixture(scope="module")
def exported(sp_model, tmp_path_factory):
    gpt = random_gpt(load(sp_model).get_piece_size())
    out = tmp_path_factory.mktemp("hf")
    write_hf(out, gpt.state_dict(), vars(gpt.config), sp_model, "NFC")
    return gpt, out


def held_out_ids(sp, n: int) -> list[int]:
    return sp.encode("".join(p.read_text() for p in HELD_OUT[:3]))[:n]


def test_the_exported_lm_computes_tokenmills_logits(sp_model, exported):
    gpt, out = exported
    assert {p.name for p in out.iterdir()} == FILES
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (
        type(hf).__name__ == "ApertusForCausalLM"
        and hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    )
    ids = held_out_ids(load(sp_model), 2 * gpt.config.block_size)
    idx = torch.tensor(ids).view(2, gpt.config.block_size)
    with torch.no_grad():
        ours, _ = gpt(idx, idx)  # with targets: logits at every position
        theirs = hf(idx).logits
    assert ours.shape == theirs.shape and (ours - theirs).abs().max().item() < 1e-4


def test_greedy_generation_gives_the_same_tokens(sp_model, exported):
    gpt, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = torch.tensor([held_out_ids(load(sp_model), 24)])
    ours = gpt.generate(prompt, 32, temperature=0)[0, 24:].tolist()
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False)[0, 24:].tolist()

    def until_eos(ids):  # HF stops at end-of-document (id 1); tokenmill's generate runs on
        return ids[: ids.index(1) + 1] if 1 in ids else ids

    assert until_eos(theirs) == until_eos(ours) and len(until_eos(ours)) > 8


def test_auto_tokenizer_encodes_and_decodes_as_sentencepiece(sp_model, exported):
    _, out = exported
    sp = load(sp_model)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.bos_token is None and tok.eos_token_id == 1 and tok.unk_token_id == 0
    for text in [TRICKY, *(p.read_text() for p in HELD_OUT)]:
        normalized = unicodedata.normalize("NFC", text)
        ids = tok(text)["input_ids"]  # raw text: the tokenizer normalizes as training did
        assert ids == sp.encode(normalized)
        assert tok.decode(ids) == normalized
    tricky_ids = tok(TRICKY)["input_ids"]
    assert {sp.id_to_piece(i) for i in tricky_ids} >= {"<0xF0>", "<0x09>"}  # byte fallback was exercised
    assert tok.decode(tricky_ids + [1], skip_special_tokens=True) == unicodedata.normalize("NFC", TRICKY)


def test_a_tokenizer_without_an_exact_conversion_is_refused(tmp_path):
    unigram = train_sentencepiece(sentences(100_000), vocab_size=600, model_type="unigram", num_threads=1)
    with pytest.raises(TokenmillError, match="model type unigram"):
        write_tokenizer(unigram, tmp_path, "NFC", 128)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- through the registry and the CLI


@pytest.fixture(scope="module")
def registry(sp_model, tmp_path_factory):
    """lm v1 (champion, sound), lm v2 (same model, wrong weights tag), lm v3 (config records
    another tokenizer sha256), clf v1 (a classifier), capped v1 (soft-capped logits)."""
    from mlflow import MlflowClient

    from tasks.core.atomic import sha256_file
    from tasks.modeling.local_model import LocalModel
    from tasks.registry.model_store import log_model

    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        client = MlflowClient()
        experiment = client.create_experiment("export", artifact_location=str(root / "artifacts"))
        tokenizer = root / "tokenizer.model"
        tokenizer.write_bytes(sp_model)
        manifest = root / "manifest.json"
        manifest.write_text(
            json.dumps(
                {
                    "corpus": {"fingerprint": "f" * 16},
                    "row_len": 64,
                    "labels": ["a", "b"],
                    "config": {"data": {"normalize": "NFC"}},
                }
            )
        )
        gpt = random_gpt(load(sp_model).get_piece_size())
        classifier = GPTClassifier(gpt.config, 2, "mean")
        sha = sha256_file(tokenizer)

        def register(name, module, tags, head=None, tokenizer_sha=sha, gpt_config=None):
            weights = root / f"{name}-{len(list(root.glob('*.pt')))}.pt"
            torch.save(module.state_dict(), weights)
            local = LocalModel(weights, tokenizer, gpt_config or vars(gpt.config), tokenizer_sha, head)
            run_id = client.create_run(experiment).info.run_id
            logged = log_model(run_id, local, manifest, "test")
            if not client.search_registered_models(f"name='{name}'"):
                client.create_registered_model(name)
            return client.create_model_version(
                name,
                logged.model_uri,
                run_id=run_id,
                model_id=logged.model_id,
                tags={"weights_sha256": weights_sha256(module.state_dict()), **tags},
            )

        v1 = register("lm", gpt, {})
        client.set_registered_model_alias("lm", "champion", v1.version)
        client.create_model_version(
            "lm", v1.source, run_id=v1.run_id, model_id=v1.model_id, tags={"weights_sha256": "0" * 64}
        )
        register("lm", gpt, {}, tokenizer_sha="1" * 64)
        register("clf", classifier, {}, head={"labels": ["a", "b"], "pooling": "mean"})
        capped = random_gpt(gpt.config.vocab_size, logit_softcap=15.0)
        register("capped", capped, {}, gpt_config=vars(capped.config))
        yield gpt, root


def tokenmill(*args):
    from typer.testing import CliRunner

    from tokenmill.cli import app

    return CliRunner().invoke(app, list(args))


def test_export_command_writes_a_checkpoint_of_a_registered_model(registry, tmp_path):
    gpt, _ = registry
    result = tokenmill("export", "models:/lm@champion", str(tmp_path / "hf"), "--format", "hf")
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "hf").iterdir()} == FILES
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # the staging directory was renamed, not left
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, gpt.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (gpt(idx, idx)[0] - hf(idx).logits).abs().max().item() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("cafe\u0301")["input_ids"] == tok("café")["input_ids"]  # NFC, as the manifest's data.normalize says


@pytest.mark.parametrize(
    "uri, fmt, expected",
    [
        ("models:/lm/1", "onnx", "unknown --format 'onnx'"),
        ("models:/lm/2", "hf", "not 000000000000 as the version tag weights_sha256 records"),
        ("models:/lm/3", "hf", "not 111111111111 as its config.json records"),
        ("models:/clf/1", "hf", "is a classifier (mean pooling, linear head with a bias)"),
        ("models:/capped/1", "hf", "soft-caps its logits (logit_softcap=15.0) and no stock transformers architecture"),
        ("runs:/abc/model", "hf", "use models:/NAME@ALIAS or models:/NAME/VERSION"),
    ],
)
def test_an_export_that_cannot_be_exact_fails_in_one_line_and_writes_nothing(registry, tmp_path, uri, fmt, expected):
    result = tokenmill("export", uri, str(tmp_path / "hf"), "--format", fmt)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_out_dir_is_left_alone(registry, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    result = tokenmill("export", "models:/lm/1", str(tmp_path / "hf"))
    assert result.exit_code == 2 and "exists and is not empty" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["hf"] and [p.name for p in (tmp_path / "hf").iterdir()] == [
        "notes.txt"
    ]
