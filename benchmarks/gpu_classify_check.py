"""GPU check of the classifier: GPT-2-small backbone, compiled, bf16, padded documents.

Issue 7 on a GPU. Like `gpu_train.py`, it imports only `model/`, so it runs on a bare
GPU machine with torch alone. The task is learnable by construction: each document's
class id is written into its first eight tokens, the rest is random, and lengths vary
from 16 to 512 tokens, right-padded with 0. It prints:

- the loss of the first and last of 60 AdamW steps (batch 32) and the accuracy on a fresh
  batch, which must approach 1.0;
- padding invariance: the largest logit change when everything past each document's
  length is replaced by random tokens (mean pooling over real tokens: must be 0);
- tokens/s over steps 11-60 (padded tokens counted) and peak memory.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_classify_check.py
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.shapes import gpt_config  # noqa: E402
from model import GPTClassifier, GPTConfig  # noqa: E402

BATCH, MAX_LEN, CLASSES, STEPS, WARM = 32, 512, 7, 60, 10


def batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = torch.randint(16, MAX_LEN + 1, (BATCH,), device=device)
    labels = torch.randint(0, CLASSES, (BATCH,), device=device)
    tokens = torch.randint(1, 50000, (BATCH, MAX_LEN), device=device)
    tokens[:, :8] = 50100 + labels[:, None]  # the class, written into the first tokens
    real = torch.arange(MAX_LEN, device=device)[None] < lengths[:, None]
    return torch.where(real, tokens, 0), lengths, labels


def main() -> None:
    torch.manual_seed(0)
    device = torch.device("cuda")
    net = GPTClassifier(gpt_config(GPTConfig, "small", vocab_size=50304, block_size=MAX_LEN), CLASSES, "mean").to(
        device
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-4, fused=True)
    compiled = torch.compile(net)
    losses, start = [], time.perf_counter()
    for i in range(STEPS):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = compiled(*batch(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if i == WARM - 1:
            torch.cuda.synchronize()
            warm_end = time.perf_counter()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - warm_end

    net.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        tokens, lengths, labels = batch(device)
        logits, _ = net(tokens, lengths)
        accuracy = (logits.argmax(-1) == labels).float().mean().item()
        real = torch.arange(MAX_LEN, device=device)[None] < lengths[:, None]
        noisy = torch.where(real, tokens, torch.randint(1, 50000, tokens.shape, device=device))
        drift = (net(noisy, lengths)[0].float() - logits.float()).abs().max().item()
    tokens_per_s = (STEPS - WARM) * BATCH * MAX_LEN / seconds
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(
        f"first {WARM} steps (compilation included) {warm_end - start:.1f} s; "
        f"then {tokens_per_s:,.0f} tokens/s (padded)"
    )
    print(
        f"loss first {losses[0]:.3f} last {losses[-1]:.4f}; accuracy on a fresh batch {accuracy:.3f}; "
        f"padding invariance: max logit change {drift:.2e}"
    )
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
