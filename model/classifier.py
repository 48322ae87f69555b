"""A text classifier: the GPT decoder as a backbone and a linear head on pooled states.

The backbone is a plain `GPT`, kept under `backbone`, so a language model's state dict
loads into it key for key and a classifier can be warm-started from a trained LM. Its
`lm_head` is tied to the token embedding, so it adds no parameters; the classifier never
runs it.

Pooling. Documents arrive right-padded to a fixed length, with `lengths` (B,) counting
the real tokens (1..T). Attention is causal, so a real position t < length only ever
attends to positions <= t, all of them real: padding never reaches a real position's
state. Pooling then reads only real positions:

- "mean": the average of the final hidden states at positions < length;
- "last": the final hidden state at position length - 1, the one token that has
  attended over the whole document.

So changing the pad tokens never changes the logits.

    model = GPTClassifier(GPTConfig(vocab_size=4096, block_size=128), n_classes=4)
    logits, loss = model(idx, lengths, targets)    # (B, n_classes), float32 scalar
"""

import torch
import torch.nn as nn
from torch.nn import functional as F

from model.gpt import GPT, GPTConfig
from model.optim import build_optimizer

POOLINGS = ("mean", "last")


def pool(x, lengths, pooling: str):
    """One vector per document (B, C) from hidden states x (B, T, C) and lengths (B,)."""
    B, T, C = x.size()
    if pooling == "last":
        index = (lengths - 1).clamp(0, T - 1).view(B, 1, 1).expand(B, 1, C)
        return x.gather(1, index).squeeze(1)  # (B, C)
    mask = torch.arange(T, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
    # Sum in float32 so a bf16 autocast does not round away long documents.
    summed = (x.float() * mask.unsqueeze(-1)).sum(dim=1)  # (B, C)
    return (summed / lengths.clamp(min=1).unsqueeze(1).float()).to(x.dtype)


class GPTClassifier(nn.Module):
    def __init__(self, config: GPTConfig, n_classes: int, pooling: str = "mean"):
        super().__init__()
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.config = config
        self.n_classes = n_classes
        self.pooling = pooling
        self.backbone = GPT(config)
        if not config.tie_embeddings:  # a separate LM head the classifier never runs: keep it out of training
            self.backbone.lm_head.weight.requires_grad_(False)
        self.head = nn.Linear(config.n_embd, n_classes, bias=True)
        self.init_head()

    def init_head(self):
        """Fresh head weights: small, so a warm-started backbone's features lead at first."""
        nn.init.normal_(self.head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, lengths, targets=None, class_weight=None):
        """Return (logits (B, n_classes), loss).

        idx (B, T) right-padded token ids, lengths (B,) real tokens per row. With targets
        (B,): the mean float32 cross-entropy over the documents, each scaled by its class's
        class_weight (n_classes,) when given. The mean is over B, not over the weights, so
        micro-batches and ranks average to exactly the loss of one big batch. Without: None.
        """
        if lengths.dim() != 1 or lengths.size(0) != idx.size(0):
            raise ValueError(f"lengths must have shape ({idx.size(0)},), got {tuple(lengths.shape)}")
        x = self.backbone.features(idx)  # (B, T, C)
        logits = self.head(pool(x, lengths, self.pooling))  # (B, n_classes)
        loss = None
        if targets is not None:
            # float32 so a bf16 autocast does not round the loss
            if class_weight is None:
                loss = F.cross_entropy(logits.float(), targets)
            else:
                loss = F.cross_entropy(logits.float(), targets, weight=class_weight, reduction="sum") / targets.size(0)
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, the tied embedding/head matrix counted once."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.backbone.transformer.wte.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per (padded) token, PaLM-style as in GPT.flops_per_token.

        The backbone's blocks and the attention term count in full; the vocabulary
        matmul does not, since the classifier never runs it. The head runs once per
        document, not per token, but it is counted per token: it is tiny either way.
        """
        cfg = self.config
        n = self.num_params(non_embedding=True)
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def configure_optimizer(
        self, weight_decay, lr, betas, device_type, *, optimizer="adamw", muon_lr=0.01, muon_momentum=0.95
    ) -> torch.optim.Optimizer:
        """GPT.configure_optimizer over the backbone and the head; the head stays on AdamW."""
        blocks = self.backbone.transformer.h
        return build_optimizer(self, blocks, weight_decay, lr, betas, device_type, optimizer, muon_lr, muon_momentum)
