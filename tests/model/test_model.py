"""Unit tests for model/gpt.py, on tiny CPU models."""

import math

import pytest
import torch

from model import GPT, GPTConfig

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 128}


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides}))
    model.eval()
    return model


def attentive_model(**overrides) -> GPT:
    """A tiny model with its matrices scaled up 5x, so that attention moves the logits as in a
    trained model and a cache that feeds attention the wrong keys or positions changes the tokens
    (at the initial scale, the argmax hardly depends on anything but the last token)."""
    model = tiny_model(**overrides)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    return model


def random_batch(vocab_size: int, B: int = 2, T: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab_size, (B, T), generator=g)
    targets = torch.randint(0, vocab_size, (B, T), generator=g)
    return idx, targets


def test_forward_shapes_with_and_without_targets():
    model = tiny_model()
    V = model.config.vocab_size
    idx, targets = random_batch(V, B=3, T=10)

    logits, loss = model(idx, targets)
    assert logits.shape == (3, 10, V)
    assert loss.shape == () and loss.dtype == torch.float32

    logits, loss = model(idx)
    assert logits.shape == (3, 1, V)
    assert loss is None


def test_last_position_logits_match_full_forward():
    model = tiny_model()
    idx, targets = random_batch(model.config.vocab_size)
    full, _ = model(idx, targets)
    last, _ = model(idx)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_features_are_the_normed_states_the_head_scores():
    model = tiny_model()
    idx, targets = random_batch(model.config.vocab_size, B=2, T=12)
    x = model.features(idx)
    assert x.shape == (2, 12, model.config.n_embd)
    torch.testing.assert_close(model.features(idx[:, :5]), x[:, :5], atol=1e-5, rtol=0)  # causal: blind to what follows
    torch.testing.assert_close(model.lm_head(x), model(idx, targets)[0])


def test_initial_loss_is_near_uniform():
    model = tiny_model()
    idx, targets = random_batch(model.config.vocab_size, B=4, T=64)
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(model.config.vocab_size)) < 0.3


def test_ignore_index_drops_positions_from_loss():
    model = tiny_model()
    idx, targets = random_batch(model.config.vocab_size)
    masked = targets.clone()
    masked[:, 8:] = -1
    _, loss_masked = model(idx, masked)
    _, loss_prefix = model(idx[:, :8], targets[:, :8])
    torch.testing.assert_close(loss_masked, loss_prefix)


def test_embedding_is_tied_to_head():
    model = tiny_model()
    assert model.transformer.wte.weight is model.lm_head.weight
    cfg = model.config
    per_layer = 12 * cfg.n_embd**2 + 2 * cfg.n_embd
    assert model.num_params() == cfg.n_layer * per_layer + cfg.n_embd + cfg.vocab_size * cfg.n_embd


def test_attention_is_causal():
    model = tiny_model()
    V = model.config.vocab_size
    idx, targets = random_batch(V, B=1, T=16)
    t = 7
    changed = idx.clone()
    changed[0, t] = (idx[0, t] + 1) % V

    before, _ = model(idx, targets)
    after, _ = model(changed, targets)
    torch.testing.assert_close(after[:, :t], before[:, :t])
    assert not torch.allclose(after[:, t:], before[:, t:])


def test_sequence_longer_than_block_size_raises():
    model = tiny_model(block_size=8)
    idx = torch.zeros((1, 9), dtype=torch.long)
    with pytest.raises(ValueError, match="block_size"):
        model(idx)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_embd": 65, "n_head": 2}, "n_embd"),
        ({"n_embd": 6, "n_head": 2}, "n_head"),  # head size 3 cannot be rotated in pairs
        ({"n_layer": 0}, "n_layer"),
        ({"vocab_size": -1}, "vocab_size"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**kwargs)


def test_tiny_model_overfits_one_batch():
    model = tiny_model(vocab_size=256)
    model.train()
    idx, targets = random_batch(256, B=4, T=32)
    optimizer = model.configure_optimizer(weight_decay=0.0, lr=3e-3, betas=(0.9, 0.95), device_type="cpu")
    _, initial = model(idx, targets)
    for _ in range(100):
        _, loss = model(idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * initial.item()


def test_optimizer_decays_matrices_only():
    model = tiny_model()
    optimizer = model.configure_optimizer(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95), device_type="cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    n_grouped = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert n_grouped == model.num_params()  # the tied matrix appears once


def test_generate_shape_and_greedy_is_deterministic():
    model = tiny_model(block_size=16)
    idx, _ = random_batch(model.config.vocab_size, B=2, T=12)
    first = model.generate(idx, max_new_tokens=10, temperature=0)
    second = model.generate(idx, max_new_tokens=10, temperature=0)
    assert first.shape == (2, 22)  # runs past block_size, so the context is cropped
    assert torch.equal(first[:, :12], idx)
    assert torch.equal(first, second)


def test_top_k_one_sampling_equals_greedy():
    model = tiny_model()
    idx, _ = random_batch(model.config.vocab_size, B=2, T=4)
    greedy = model.generate(idx, max_new_tokens=5, temperature=0)
    sampled = model.generate(idx, max_new_tokens=5, temperature=1.0, top_k=1)
    assert torch.equal(sampled, greedy)


def test_sampling_is_reproducible_with_a_generator():
    model = tiny_model()
    idx, _ = random_batch(model.config.vocab_size, B=2, T=4)
    runs = [
        model.generate(idx, 8, temperature=1.0, generator=torch.Generator().manual_seed(s)) for s in (123, 123, 124)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_decoding_one_token_at_a_time_with_caches_matches_the_full_forward():
    from model.gpt import KVCache

    model = tiny_model(block_size=16)
    idx, targets = random_batch(model.config.vocab_size, B=2, T=16)
    full, _ = model(idx, targets)  # (B, T, vocab)
    caches = [KVCache(16) for _ in model.transformer.h]
    prefill, _ = model(idx[:, :6], caches=caches)
    steps = [
        model(idx[:, [t]], caches=caches)[0] for t in range(6, 16)
    ]  # each sees all keys so far, at its own position
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full[:, 5:], atol=1e-5, rtol=1e-5)


def test_a_filled_cache_takes_one_token_at_a_time():
    from model.gpt import KVCache

    model = tiny_model(block_size=16)
    idx, _ = random_batch(model.config.vocab_size, B=1, T=8)
    caches = [KVCache(16) for _ in model.transformer.h]
    model(idx[:, :4], caches=caches)
    with pytest.raises(ValueError, match="one token at a time"):
        model(idx[:, 4:], caches=caches)


def test_cached_greedy_generation_equals_uncached():
    model = attentive_model()
    idx, _ = random_batch(model.config.vocab_size, B=3, T=7)
    cached = model.generate(idx, max_new_tokens=40, temperature=0)
    assert torch.equal(cached, model.generate(idx, max_new_tokens=40, temperature=0, use_cache=False))


@pytest.mark.parametrize("prompt_len", [3, 12, 16, 21])  # crosses block_size early, late, at once; cropped prompt
def test_cached_generation_equals_uncached_past_block_size(prompt_len):
    model = attentive_model(block_size=16)
    idx, _ = random_batch(model.config.vocab_size, B=2, T=prompt_len)
    cached = model.generate(idx, max_new_tokens=20, temperature=0)
    uncached = model.generate(idx, max_new_tokens=20, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt_len + 20) and torch.equal(cached[:, :prompt_len], idx)
    assert torch.equal(cached, uncached)


def test_cached_sampling_equals_uncached_with_the_same_generator():
    model = attentive_model(block_size=16)
    idx, _ = random_batch(model.config.vocab_size, B=2, T=5)
    runs = [
        model.generate(idx, 24, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(7), use_cache=c)
        for c in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])


def test_gpt2_small_shape_has_124m_parameters():
    cfg = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024)
    with torch.device("meta"):
        model = GPT(cfg)
    assert abs(model.num_params() - 124e6) / 124e6 < 0.02
    assert model.num_params(non_embedding=True) == model.num_params() - 50304 * 768


def test_flops_per_token_matches_palm_formula():
    model = tiny_model()
    L, C, V, T = (model.config.n_layer, model.config.n_embd, model.config.vocab_size, model.config.block_size)
    n = L * (12 * C * C + 2 * C) + C + V * C  # blocks, final norm, head matmul
    assert model.flops_per_token() == 6 * n + 12 * L * C * T


def test_meta_built_model_matches_after_init_weights():
    torch.manual_seed(0)
    reference = GPT(GPTConfig(**TINY))
    with torch.device("meta"):
        model = GPT(GPTConfig(**TINY))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    torch.testing.assert_close(model.rope_cos, reference.rope_cos)
    torch.testing.assert_close(model.rope_sin, reference.rope_sin)
    assert model.transformer.wte.weight is model.lm_head.weight
    idx, targets = random_batch(model.config.vocab_size)
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(model.config.vocab_size)) < 0.3


def test_residual_projections_start_smaller():
    model = tiny_model(n_layer=8)
    block = model.transformer.h[0]
    expected = 0.02 / math.sqrt(2 * 8)
    for proj in (block.attn.c_proj, block.mlp.c_proj):
        assert abs(proj.weight.std().item() - expected) < 0.1 * expected
    assert abs(block.mlp.c_fc.weight.std().item() - 0.02) < 0.002


def test_rmsnorm_fallback_matches_fused(monkeypatch):
    from model.gpt import RMSNorm

    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8)
    fused = norm(x)
    monkeypatch.delattr(torch.nn.functional, "rms_norm", raising=False)
    torch.testing.assert_close(norm(x), fused)
    expected = x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * norm.weight
    torch.testing.assert_close(fused, expected)


def test_rotary_scores_depend_on_relative_position_only():
    from model.gpt import apply_rotary, rotary_tables

    cos, sin = rotary_tables(head_dim=8, block_size=32, base=10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)

    def score(m, n):
        return apply_rotary(q, cos[m], sin[m]) @ apply_rotary(k, cos[n], sin[n])

    torch.testing.assert_close(score(5, 2), score(20, 17))
    assert not torch.allclose(score(5, 2), score(5, 4))
