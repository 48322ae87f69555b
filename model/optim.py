"""Muon for a Transformer's hidden matrices and AdamW for everything else, as one optimizer.

Muon (Keller Jordan, 2024; used by modded-nanogpt and nanochat) takes SGD's Nesterov
momentum for a weight matrix and replaces it by the nearest semi-orthogonal matrix,
U V^T of its SVD U S V^T, before stepping: every direction of the update moves by the
same amount, instead of the few largest directions dominating. U V^T is approximated by
five iterations of a quintic Newton-Schulz map, which only multiplies matrices.

It applies to the 2-D weights inside the blocks. The token embedding (a lookup, not a
matmul), the head and the norm gains stay on AdamW: param groups with `muon=False` take
torch's own AdamW update (`torch.optim.adamw.adamw`, fused on CUDA).

Why not `torch.optim.Muon`: it runs Newton-Schulz in bfloat16 on every device, which on
CPU made each step 2.5x slower and trained a worse model in equal time. Here the dtype
is chosen per device (float32 on CPU, bfloat16 on CUDA), one class holds both kinds of
group (one state dict, one LR schedule), and a q/k/v matrix stacked into one projection
is orthogonalised as its three parts (`split`).

    groups = [{"params": hidden_matrices, "muon": True, "lr": 0.02},
              {"params": embeddings_and_gains, "lr": 3e-3}]
    optimizer = Muon(groups, lr=3e-3, ns_dtype=torch.float32)
"""

import torch
from torch.optim.adamw import adamw

# The quintic's coefficients from modded-nanogpt: they push every singular value of the
# normalised matrix into roughly [0.7, 1.2] in five steps, which is close enough to 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately U V^T for each matrix g (..., rows, cols) = U S V^T, in `dtype`."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.mT


def orthogonalize(updates: list[torch.Tensor], split: int, steps: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """newton_schulz of each update (rows, cols), seen as `split` stacked (rows / split, cols) parts.

    Updates of one shape go through Newton-Schulz together, as one batch: on a GPU that is a
    few large matmuls instead of many small ones (a GPT-2-small step spent 29 ms in Muon
    with one matrix at a time; see BENCHMARKS.md). A sharded parameter (FSDP2's DTensor) is
    gathered first, since Newton-Schulz needs the whole matrix: every rank computes the same
    result and keeps its own shard of it.
    """
    full = [u.full_tensor() if hasattr(u, "full_tensor") else u for u in updates]
    out: list[torch.Tensor | None] = [None] * len(updates)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, u in enumerate(full):
        by_shape.setdefault(tuple(u.shape), []).append(i)
    for (rows, cols), members in by_shape.items():
        stacked = torch.stack([full[i] for i in members]).view(len(members) * split, rows // split, cols)
        result = newton_schulz(stacked, steps, dtype).view(len(members), rows, cols)
        for j, i in enumerate(members):
            out[i] = result[j].to(full[i].dtype)
    for i, u in enumerate(updates):
        if full[i] is not u:
            from torch.distributed.tensor import distribute_tensor

            out[i] = distribute_tensor(out[i], u.device_mesh, u.placements)
    return out


class Muon(torch.optim.Optimizer):
    """Muon on groups with `muon=True`, AdamW on the others.

    Muon groups: lr, momentum (0.95), nesterov, weight_decay (decoupled), ns_steps and
    split (1, or 3 for a stacked q/k/v projection). Each matrix's step is scaled by
    sqrt(max(1, rows / cols)) so tall and wide matrices move alike per entry.
    AdamW groups: lr, betas, eps, weight_decay, exactly as torch.optim.AdamW.
    """

    def __init__(
        self,
        params,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.float32,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            split=1,
            muon=False,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups take 2-D weight matrices only; put the rest in AdamW groups")
        self.ns_dtype = ns_dtype  # not in the groups: a dtype is not plain data in a checkpoint

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        params = [p for p in group["params"] if p.grad is not None]
        updates = []
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            updates.append(p.grad.lerp(buf, momentum) if group["nesterov"] else buf)
        for p, update in zip(params, orthogonalize(updates, group["split"], group["ns_steps"], self.ns_dtype)):
            rows, cols = p.shape
            p.mul_(1 - lr * decay)
            p.add_(update, alpha=-lr * max(1.0, rows / group["split"] / cols) ** 0.5)

    def _adamw_step(self, group: dict) -> None:
        """torch's own AdamW update (its functional form), fused on CUDA as torch.optim.AdamW(fused=True)."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        fused = params[0].is_cuda and not any(hasattr(p, "full_tensor") for p in params)
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            if fused and state["step"].device != p.device:  # the fused kernel counts steps on the device
                state["step"] = state["step"].to(p.device)
        beta1, beta2 = group["betas"]
        adamw(
            params,
            [p.grad for p in params],
            [self.state[p]["exp_avg"] for p in params],
            [self.state[p]["exp_avg_sq"] for p in params],
            [],
            [self.state[p]["step"] for p in params],
            foreach=False,
            fused=fused,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


def build_optimizer(model, blocks, weight_decay, lr, betas, device_type, optimizer, muon_lr, muon_momentum):
    """GPT.configure_optimizer for any module (a GPT, a classifier) whose hidden matrices are those of `blocks`."""
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = [p for p in blocks.parameters() if p.requires_grad and p.dim() == 2] if optimizer == "muon" else []
    taken = {id(p) for p in hidden}
    decay = [p for p in params if p.dim() >= 2 and id(p) not in taken]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if optimizer == "adamw":
        # The fused kernel is CUDA-only and does one launch per step instead of many.
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")
    if optimizer != "muon":
        raise ValueError(f"optimizer must be adamw or muon, got {optimizer!r}")
    qkv = {id(b.attn.c_attn.weight) for b in blocks}
    for split in (3, 1):
        mats = [p for p in hidden if (id(p) in qkv) == (split == 3)]
        groups.append({"params": mats, "muon": True, "split": split, "lr": muon_lr, "momentum": muon_momentum})
    # Newton-Schulz in bfloat16 on CUDA (tensor cores), float32 elsewhere (bfloat16 is slow on CPU).
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    return Muon(groups, lr=lr, betas=betas, ns_dtype=dtype)
