"""Each network the export writes is a stock transformers architecture that computes our GPT's logits.

A tiny GPT with random weights (norm gains too, so a swapped or dropped norm shows) is written
with `write_model` and loaded back with AutoModelForCausalLM; no tokenizer, no registry.
"""

import pytest
import torch

from model import GPT, GPTConfig
from tasks.registry.export import hf_config, write_model
from tokenmill.errors import TokenmillError

transformers = pytest.importorskip("transformers")

SHAPES = dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32, rope_base=5000.0, norm_eps=1e-6)
# The fields a gpt_config recorded before the architecture options had.
OLD_FIELDS = {*SHAPES, "dropout"}
CASES = {
    "arcee-gelu": ({"mlp": "gelu"}, "ArceeForCausalLM"),
    "arcee-relu2": ({"mlp": "relu2"}, "ArceeForCausalLM"),
    "apertus-relu2-qk-norm": ({"mlp": "relu2", "qk_norm": True}, "ApertusForCausalLM"),
    "arcee-untied": ({"mlp": "relu2", "tie_embeddings": False}, "ArceeForCausalLM"),
    "apertus-untied": ({"mlp": "gelu", "qk_norm": True, "tie_embeddings": False}, "ApertusForCausalLM"),
}


def random_gpt(**arch) -> GPT:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**SHAPES, **arch)).eval()
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            p.normal_(1.0, 0.3) if name.endswith("norm.weight") or ".ln_" in name else p.normal_(0.0, 0.2)
    return gpt


def exported_logits(gpt: GPT, gpt_config: dict, out) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    write_model(out, gpt.state_dict(), gpt_config, eos_id=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, SHAPES["vocab_size"], (2, SHAPES["block_size"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = gpt(idx, idx)  # with targets: logits at every position
        theirs = hf(idx).logits
    return ours, theirs, hf


@pytest.mark.parametrize("arch, expected", CASES.values(), ids=CASES.keys())
def test_the_exported_network_computes_our_logits(tmp_path, arch, expected):
    gpt = random_gpt(**arch)
    ours, theirs, hf = exported_logits(gpt, vars(gpt.config), tmp_path)
    assert type(hf).__name__ == expected
    assert ours.std() > 1.0  # logits of this size make a wrong activation or norm plain
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # transformers leaves a head that differs from the embedding untied whatever the config says,
    # but warns on every load when the config says tied.
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert tied == hf.config.tie_word_embeddings == gpt.config.tie_embeddings


def test_a_gpt_config_recorded_before_the_options_exports_the_network_it_trained(tmp_path):
    gpt = random_gpt()  # GPTConfig's defaults: the old network
    old = {name: value for name, value in vars(gpt.config).items() if name in OLD_FIELDS}
    config = hf_config(old)
    assert (config["architectures"], config["hidden_act"], config["tie_word_embeddings"]) == (
        ["ArceeForCausalLM"],
        "gelu",
        True,
    )
    ours, theirs, _ = exported_logits(gpt, old, tmp_path)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_apertus_rotates_with_our_rope_base_and_no_llama3_scaling():
    config = hf_config({**SHAPES, "qk_norm": True}, eos_id=1)
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 5000.0}
    hf = transformers.AutoConfig.for_model(**config)
    assert (hf.rope_parameters["rope_type"], hf.bos_token_id, hf.pad_token_id, hf.eos_token_id) == (
        "default",
        None,
        None,
        1,
    )


def test_weights_that_disagree_with_their_gpt_config_are_refused(tmp_path):
    gpt = random_gpt(qk_norm=True)
    with pytest.raises(TokenmillError, match=r"unexpected \['transformer.h.0.attn.q_norm.weight'"):
        write_model(tmp_path, gpt.state_dict(), {**vars(gpt.config), "qk_norm": False}, eos_id=1)
    untied = random_gpt(tie_embeddings=False)
    with pytest.raises(TokenmillError, match="lm_head.weight differs from the token embedding"):
        write_model(tmp_path, untied.state_dict(), {**vars(untied.config), "tie_embeddings": True}, eos_id=1)
    assert list(tmp_path.iterdir()) == []


def test_a_soft_capped_model_is_refused_before_anything_is_written(tmp_path):
    gpt = random_gpt(logit_softcap=15.0)
    with pytest.raises(TokenmillError) as refused:
        write_model(tmp_path, gpt.state_dict(), vars(gpt.config), eos_id=1)
    message = str(refused.value)
    assert "\n" not in message and "soft-caps its logits" in message and "model.logit_softcap=0" in message
    assert list(tmp_path.iterdir()) == []
