"""The modern recipe's levers in model/gpt.py: shapes, causality, caches, init and options."""

import pytest
import torch

from model import GPT, GPTConfig

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 128}
LEVERS = {
    "relu2": {"mlp": "relu2"},
    "qk_norm": {"qk_norm": True},
    "untied": {"tie_embeddings": False},
    "softcap": {"logit_softcap": 15.0},
    "modern": {"mlp": "relu2", "qk_norm": True, "zero_init_proj": True},
}


def build(seed: int = 0, scale: float = 1.0, **levers) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**TINY, **levers)).eval()
    with torch.no_grad():  # zero-init projections would hide attention; give every weight a value
        for p in model.parameters():
            if p.dim() == 2 and (scale != 1.0 or not p.any()):
                p.copy_(torch.randn_like(p) * 0.02 * scale)
    return model


@pytest.mark.parametrize("lever", sorted(LEVERS))
def test_each_lever_keeps_the_shapes(lever):
    model = build(**LEVERS[lever])
    idx = torch.randint(0, 128, (3, 20))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 20, 128) and loss.shape == ()
    logits, _ = model(idx)
    assert logits.shape == (3, 1, 128)


@pytest.mark.parametrize("lever", sorted(LEVERS))
def test_each_lever_keeps_attention_causal(lever):
    model = build(scale=5.0, **LEVERS[lever])
    idx = torch.randint(0, 128, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 128
    before, _ = model(idx, idx)
    after, _ = model(changed, changed)
    torch.testing.assert_close(before[:, :12], after[:, :12])
    assert not torch.allclose(before[:, 12:], after[:, 12:])


@pytest.mark.parametrize("lever", sorted(LEVERS))
def test_each_lever_decodes_with_caches_as_without(lever):
    model = build(scale=5.0, **LEVERS[lever])
    prompt = torch.randint(0, 128, (2, 5))
    cached = model.generate(prompt, 12, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 12, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_zero_init_projections_start_every_block_as_the_identity():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, zero_init_proj=True))
    for block in model.transformer.h:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    x = torch.randn(2, 7, 32)
    cos, sin = model.rope_cos[:7], model.rope_sin[:7]
    torch.testing.assert_close(model.transformer.h[0](x, cos, sin), x)


def test_qk_norm_normalises_each_head_of_q_and_k():
    model = build(scale=5.0, qk_norm=True)  # q well above the norm's eps
    attn = model.transformer.h[0].attn
    seen = {}
    attn.q_norm.register_forward_hook(lambda m, i, o: seen.setdefault("q", o))
    model(torch.randint(0, 128, (2, 9)))
    q = seen["q"]  # (B, T, nh, hs), gains at their initial ones
    assert q.shape == (2, 9, 2, 16)
    torch.testing.assert_close(q.pow(2).mean(-1), torch.ones(2, 9, 2), atol=1e-3, rtol=0)


def test_relu2_is_relu_squared():
    model = build(mlp="relu2")
    mlp = model.transformer.h[0].mlp
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(mlp(x), mlp.c_proj(torch.relu(mlp.c_fc(x)) ** 2))


def test_an_untied_head_is_its_own_matrix_and_counted_in_flops():
    tied, untied = build(), build(tie_embeddings=False)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params() == tied.num_params() + 128 * 32
    assert untied.flops_per_token() == tied.flops_per_token()  # the head is a matmul either way


def test_softcap_bounds_the_logits():
    model = build(scale=50.0, logit_softcap=5.0)
    logits, _ = model(torch.randint(0, 128, (2, 9)), torch.randint(0, 128, (2, 9)))
    assert logits.abs().max() < 5.0
    assert logits.abs().max() > 4.0  # the large weights saturate it


def test_unknown_mlp_names_the_choices():
    with pytest.raises(ValueError, match="mlp must be one of gelu, relu2"):
        GPTConfig(mlp="swish")


def test_default_config_is_the_gpt2_network():
    """GPTConfig's defaults are what gpt_configs recorded before the levers existed compute."""
    cfg = GPTConfig()
    assert (cfg.mlp, cfg.qk_norm, cfg.tie_embeddings, cfg.zero_init_proj, cfg.logit_softcap) == (
        "gelu",
        False,
        True,
        False,
        0.0,
    )
    assert not any("q_norm" in name for name in GPT(cfg).state_dict())
