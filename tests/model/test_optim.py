"""Unit tests for model/optim.py: Newton-Schulz, Muon's update, its AdamW groups, its state."""

import copy

import pytest
import torch

from model import GPT, GPTConfig
from model.optim import Muon, newton_schulz


def random_matrix(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rows, cols", [(16, 16), (8, 24), (24, 8)])
def test_newton_schulz_is_close_to_the_orthogonal_factor(rows, cols):
    g = random_matrix(rows, cols)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    out = newton_schulz(g)
    assert out.shape == g.shape and out.dtype == torch.float32
    # Every singular value is pushed towards 1 (the quintic stops in roughly [0.7, 1.2])...
    singular = torch.linalg.svdvals(out)
    assert singular.min() > 0.5 and singular.max() < 1.3
    # ...with the singular vectors of g kept: out is U diag(s') V^T with s' near 1.
    inner = u.T @ out @ vh.T
    assert torch.allclose(inner, torch.diag(torch.diagonal(inner)), atol=1e-3)


def reference_muon_update(grad, buf, lr, momentum, split):
    """One Muon step written out directly: Nesterov momentum, the quintic five times on each part."""
    buf = momentum * buf + (1 - momentum) * grad
    update = (1 - momentum) * grad + momentum * buf  # Nesterov: look ahead along the new momentum
    parts = []
    for part in update.chunk(split, dim=0):
        x = part.T if part.size(0) > part.size(1) else part
        x = x / (x.norm() + 1e-7)
        for _ in range(5):
            a = x @ x.T
            x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
        parts.append(x.T if part.size(0) > part.size(1) else x)
    rows, cols = update.size(0) // split, update.size(1)
    return -lr * max(1.0, rows / cols) ** 0.5 * torch.cat(parts), buf


@pytest.mark.parametrize("shape, split", [((12, 6), 1), ((6, 12), 1), ((18, 6), 3)])
def test_muon_step_matches_a_direct_computation(shape, split):
    w = torch.nn.Parameter(random_matrix(*shape, seed=1))
    start = w.detach().clone()
    opt = Muon([{"params": [w], "muon": True, "split": split, "lr": 0.05}], lr=1e-3)
    buf = torch.zeros(shape)
    expected = start.clone()
    for step in range(3):
        w.grad = random_matrix(*shape, seed=10 + step)
        delta, buf = reference_muon_update(w.grad, buf, 0.05, 0.95, split)
        expected += delta
        opt.step()
    torch.testing.assert_close(w.detach(), expected, atol=1e-5, rtol=0)


def test_the_adamw_groups_step_as_torch_adamw():
    params = [torch.nn.Parameter(random_matrix(5, 7, seed=s)) for s in (2, 3)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = Muon([{"params": params, "weight_decay": 0.1}], lr=3e-3, betas=(0.9, 0.95))
    theirs = torch.optim.AdamW(twins, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    for step in range(5):
        for p, q, s in zip(params, twins, (20, 30)):
            p.grad = random_matrix(5, 7, seed=s + step)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, atol=1e-7, rtol=0)


def test_muon_groups_take_matrices_only():
    with pytest.raises(ValueError, match="2-D"):
        Muon([{"params": [torch.nn.Parameter(torch.ones(4))], "muon": True}], lr=1e-3)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, mlp="relu2", qk_norm=True)
    return GPT(cfg)


def train_steps(model, optimizer, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, 64, (4, 16), generator=g)
        _, loss = model(idx, torch.roll(idx, -1, dims=1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_the_optimizer_puts_block_matrices_on_muon_and_the_rest_on_adamw():
    model = tiny_gpt()
    opt = model.configure_optimizer(0.1, 3e-3, (0.9, 0.95), "cpu", optimizer="muon", muon_lr=0.02)
    on_muon = {id(p) for g in opt.param_groups if g["muon"] for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[i] for i in on_muon) == sorted(
        n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2
    )
    qkv = [g for g in opt.param_groups if g["muon"] and g["split"] == 3]
    assert [names[id(p)] for p in qkv[0]["params"]] == [f"transformer.h.{i}.attn.c_attn.weight" for i in (0, 1)]
    assert opt.ns_dtype == torch.float32  # bfloat16 only on CUDA


def test_a_restored_optimizer_continues_bitwise():
    model = tiny_gpt()
    opt = model.configure_optimizer(0.1, 3e-3, (0.9, 0.95), "cpu", optimizer="muon")
    train_steps(model, opt, 3, seed=5)
    twin = copy.deepcopy(model)
    twin_opt = twin.configure_optimizer(0.1, 3e-3, (0.9, 0.95), "cpu", optimizer="muon")
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    train_steps(model, opt, 2, seed=6)
    train_steps(twin, twin_opt, 2, seed=6)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name


def test_muon_trains_a_tiny_model_below_adamw_in_equal_steps():
    losses = {}
    for name in ("adamw", "muon"):
        model = tiny_gpt(seed=1)
        opt = model.configure_optimizer(0.0, 3e-3, (0.9, 0.95), "cpu", optimizer=name, muon_lr=0.02)
        g = torch.Generator().manual_seed(7)
        idx = torch.randint(0, 64, (8, 16), generator=g)
        for _ in range(30):  # one fixed batch: how fast each optimizer fits it
            _, loss = model(idx, torch.roll(idx, -1, dims=1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses[name] = loss.item()
    assert losses["muon"] < losses["adamw"], losses
