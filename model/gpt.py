"""A GPT-style decoder-only Transformer, the network that tokenmill trains.

The layout follows nanoGPT's model.py: the config first, then the small parts
(norm, rotary embeddings, attention, MLP, block), then the whole network. It
differs from GPT-2 in three places: RMSNorm instead of LayerNorm, rotary
position embeddings instead of a learned position table, and no biases.

GPTConfig's defaults are that network, the one tokenmill's `gpt2` recipe trains and
every gpt_config recorded before the modern recipe describes. The modern recipe
(tokenmill's default, after modded-nanogpt and nanochat) turns on two levers:
qk_norm (q and k RMS-normalised per head before the rotary embedding) and mlp="relu2"
(ReLU squared instead of GELU). Options, each measured in BENCHMARKS.md: zero_init_proj
(each block's output projections start at zero, so every block starts as the identity),
an untied head, and logit_softcap (c * tanh(logits / c), as Gemma 2), which no stock
Hugging Face architecture of our shape computes, so a model trained with it does not export.

This module only builds the network. Compilation, DDP and FSDP are applied
from outside, so the code here never changes when the hardware does.

    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=4096))
    logits, loss = model(idx, targets)
    out = model.eval().generate(idx, max_new_tokens=64, temperature=0.8, top_k=50)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from model.optim import build_optimizer


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = 256  # longest context the model can attend over
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # the MLP's activation: "gelu" (GPT-2) or "relu2" (ReLU squared)
    qk_norm: bool = False  # RMSNorm on each head's q and k before the rotary embedding
    tie_embeddings: bool = True  # one matrix embeds tokens and scores them
    zero_init_proj: bool = False  # blocks' output projections start at zero (else GPT-2's scaled init)
    logit_softcap: float = 0.0  # > 0: logits = softcap * tanh(logits / softcap)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"pick n_embd as a multiple of n_head"
            )
        head_dim = self.n_embd // self.n_head
        if head_dim % 2 != 0:
            raise ValueError(
                f"head size n_embd // n_head = {head_dim} must be even for rotary embeddings; change n_embd or n_head"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.rope_base <= 0:
            raise ValueError(f"rope_base must be positive, got {self.rope_base!r}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")
        if self.mlp not in MLP_ACTIVATIONS:
            raise ValueError(f"mlp must be one of {', '.join(MLP_ACTIVATIONS)}, got {self.mlp!r}")
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap must be >= 0 (0 turns it off), got {self.logit_softcap!r}")


def relu2(x):
    """ReLU squared (So et al. 2021, "Primer"): sparse like ReLU, smooth at zero like GELU."""
    return F.relu(x).square()


MLP_ACTIVATIONS = {"gelu": F.gelu, "relu2": relu2}


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learnable gain and no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if hasattr(F, "rms_norm"):  # fused kernel, torch >= 2.4
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        # Reduce in float32 so half-precision inputs do not lose the mean square.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rotary_tables(head_dim: int, block_size: int, base: float, device=None):
    """cos and sin tables for every position up to block_size, each (T, hs)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    pos = torch.arange(block_size, dtype=torch.float32, device=device)
    angles = torch.outer(pos, inv_freq)  # (T, hs/2)
    # The rotate-half convention pairs channel i with channel i + hs/2, so each
    # frequency appears once in each half.
    angles = torch.cat((angles, angles), dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """Rotate q or k (B, T, nh, hs) by position, so q.k depends on relative offset.

    cos and sin are (T, 1, hs): one row per position, shared by every head.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # keep autocast's dtype for attention
    return x * cos + rotate_half(x) * sin


class KVCache:
    """One attention layer's keys and values for the positions generation has seen.

    Generation first feeds the whole prompt (the prefill), then one new token per step;
    each step reads the earlier keys and values from here instead of recomputing them.
    The prefill allocates room for `size` positions, in the dtype and on the device of
    its keys, so later steps only copy into that room.
    """

    def __init__(self, size: int):
        self.size = size
        self.len = 0  # positions stored
        self.k = self.v = None  # each (B, nh, size, hs) once the prefill has run

    def append(self, k, v):
        """Store k and v (B, nh, T, hs) after the stored positions; return all, (B, nh, len, hs)."""
        if self.k is None:
            B, nh, _, hs = k.shape
            self.k, self.v = k.new_empty(B, nh, self.size, hs), v.new_empty(B, nh, self.size, hs)
        start, self.len = self.len, self.len + k.size(2)
        self.k[:, :, start : self.len] = k
        self.v[:, :, start : self.len] = v
        return self.k[:, :, : self.len], self.v[:, :, : self.len]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # q, k and v for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)
        # QK-norm bounds the attention logits, which lets the optimizer take larger steps.
        hs = config.n_embd // config.n_head
        self.q_norm = RMSNorm(hs, config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hs, config.norm_eps) if config.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, cache=None):
        B, T, C = x.size()
        hs = C // self.n_head
        # Stay in the (B, T, nh, hs) layout the projection produces: rotate q and k there and
        # hand SDPA transposed views. Its backward then returns dq, dk and dv in that layout,
        # so the qkv gradient is assembled without a transposing copy (that copy took 11% of
        # a GPT-2-small step on an H100; see BENCHMARKS.md).
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, hs).unbind(2)  # each (B, T, nh, hs)
        cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, hs)
        q, k = self.q_norm(q), self.k_norm(k)  # per head, over hs; identities without qk_norm
        q, k, v = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v.contiguous()
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # each (B, nh, T, hs)
        if cache is not None:
            k, v = cache.append(k, v)  # each (B, nh, L, hs): every position so far
        # The T queries are the last T of the L keys. With T == L (training, a prefill) that is
        # SDPA's causal mask. A decode step (T == 1) sees every key and needs no mask: is_causal
        # would align its mask top-left and hide all keys but the first.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=T == k.size(2),
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.act = MLP_ACTIVATIONS[config.mlp]
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.act(self.c_fc(x))  # (B, T, 4C)
        return self.dropout(self.c_proj(x))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: the residual stream itself is never normalised."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.ln_1(x), cos, sin, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


def next_token(logits, temperature, top_k, generator):
    """Pick one token id (B, 1) from last-position logits (B, vocab)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits / temperature
    if top_k is not None:
        kth, _ = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k)
        logits[logits < kth[:, [-1]]] = -float("inf")
    probs = F.softmax(logits, dim=-1)  # (B, vocab)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=RMSNorm(config.n_embd, config.norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables are derived from the config, so they stay out of checkpoints.
        cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs)
        self.register_buffer("rope_sin", sin, persistent=False)  # (block_size, hs)
        self.init_weights()

    def init_weights(self):
        """Draw fresh weights and rebuild the rotary tables.

        Called by __init__. Call it again after `to_empty()` when the model was
        built on the meta device, since that leaves buffers and weights unset
        and gives the embedding and the head separate storage.
        """
        # Weight tying: one matrix both embeds tokens and scores them, which saves
        # vocab_size * n_embd parameters and helps small models.
        if self.config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        cos, sin = rotary_tables(
            self.config.n_embd // self.config.n_head,
            self.config.block_size,
            self.config.rope_base,
            device=self.rope_cos.device,
        )
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
        self.apply(self._init_module)
        # GPT-2: each block adds two projections to the residual stream, so shrink
        # them to keep its variance from growing with depth. zero_init_proj goes all
        # the way: every block starts as the identity (modded-nanogpt, nanochat).
        proj_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                if self.config.zero_init_proj:
                    nn.init.zeros_(proj.weight)
                else:
                    nn.init.normal_(proj.weight, mean=0.0, std=proj_std)

    @staticmethod
    def _init_module(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def features(self, idx, caches=None):
        """The final-normed hidden states (B, T, C) of token ids idx (B, T).

        Position t depends only on positions <= t (causal attention), which is
        what lets a classifier on top ignore right padding.

        caches, one KVCache per layer, are for generation: idx then continues the
        positions the caches hold, either all of a prompt into empty caches or one
        token (T == 1) at a time.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        B, T = idx.size()
        start = 0 if caches is None else caches[0].len  # absolute position of idx[:, 0]
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence length {start + T} exceeds block_size {self.config.block_size}; "
                f"crop the input or raise block_size"
            )
        if start > 0 and T > 1:
            raise ValueError(f"a filled KV cache takes one token at a time, got {T}")
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]  # (T, hs)
        x = self.transformer.drop(self.transformer.wte(idx))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cos, sin, None if caches is None else caches[i])  # (B, T, C)
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(self, idx, targets=None, caches=None):
        """Return (logits, loss).

        With targets: logits for every position, (B, T, vocab), and the mean
        float32 cross-entropy; targets of -1 are ignored. Without targets: only
        the last position's logits, (B, 1, vocab), and None, which is all that
        generation needs and saves the full head matmul. caches: see features().
        """
        x = self.features(idx, caches)  # (B, T, C)
        if targets is not None:
            logits = self.head(x)  # (B, T, vocab)
            # float32 so a bf16 autocast does not round the loss
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:
            logits = self.head(x[:, [-1], :])  # (B, 1, vocab); list index keeps the T dim
            loss = None
        return logits, loss

    def head(self, x):
        """Logits (B, T, vocab) of hidden states x (B, T, C), soft-capped when configured."""
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        if cap:
            logits = cap * torch.tanh(logits.float() / cap)  # float32: tanh saturates early in bf16
        return logits

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, *, generator=None, use_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T) and return (B, T + n).

        temperature == 0 picks the argmax. Pass a seeded `generator` for
        reproducible sampling. Call model.eval() first if dropout is on.

        Each new token is predicted from at most the last block_size tokens: a
        longer prompt is cropped to its last block_size tokens, and once the
        sequence outgrows block_size the window slides by one token per step,
        its first token always at rotary position 0.

        use_cache keeps each layer's keys and values in a KVCache, so that a step
        feeds one token through the network instead of the whole context. When
        the window slides, every token moves to a new rotary position and every
        cached key goes stale, so from then on each step feeds the whole window
        through the network, as use_cache=False does at every step. The two give
        the same tokens up to float rounding (tests/test_model.py checks that
        they are identical).
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        block_size = self.config.block_size
        caches = None
        for _ in range(max_new_tokens):
            if not use_cache or idx.size(1) > block_size:
                idx_cond = idx if idx.size(1) <= block_size else idx[:, -block_size:]
                logits, _ = self(idx_cond)
            elif caches is None:  # prefill: the whole prompt, filling the caches
                caches = [KVCache(block_size) for _ in self.transformer.h]
                logits, _ = self(idx, caches=caches)
            else:  # decode: only the newest token, its position after the cached ones
                logits, _ = self(idx[:, -1:], caches=caches)
            idx_next = next_token(logits[:, -1, :].float(), temperature, top_k, generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
        return idx

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, a tied embedding/head matrix counted once.

        non_embedding=True leaves the embedding out, the N of the scaling-law papers
        (an untied head stays in: it is a real matmul).
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token at full context, as in PaLM appendix B.

            6 * N + 12 * n_layer * n_embd * block_size

        6 * N covers the forward (2) and backward (4) matmuls against every weight.
        N is the non-embedding count plus the head matrix once: the embedding is a
        lookup, but the head is a real (C, vocab) matmul, tied or not. The second term
        is attention itself (QK^T and AV), which has no weights. Norm gains count too
        (a rounding error), the optimizer's own work (Muon's Newton-Schulz) does not.
        """
        cfg = self.config
        n = self.num_params(non_embedding=True) + (cfg.vocab_size * cfg.n_embd if cfg.tie_embeddings else 0)
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def configure_optimizer(
        self, weight_decay, lr, betas, device_type, *, optimizer="adamw", muon_lr=0.01, muon_momentum=0.95
    ) -> torch.optim.Optimizer:
        """The optimizer of `optimizer`: "adamw" or "muon".

        adamw: AdamW at `lr` that decays matrices (matmul weights, the embedding) but not gains.
        muon: Muon at `muon_lr` for the blocks' matrices (q, k and v orthogonalised apart),
        AdamW at `lr` for the embedding, the head and the gains, as above.
        """
        return build_optimizer(
            self, self.transformer.h, weight_decay, lr, betas, device_type, optimizer, muon_lr, muon_momentum
        )
