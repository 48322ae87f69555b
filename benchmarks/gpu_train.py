"""GPU training benchmark: GPT-2-small throughput, MFU and memory per micro-batch.

Issue 4, "Performance", GPU bullet. This script imports only `model/` and the shard
reader (`tasks/core/shards.py`), so it runs on a bare GPU machine with torch, numpy and
pyarrow and nothing else of tokenmill's stack. It writes random-token shards to a temp
directory, opens them through `ShardSet` like the trainer does, and feeds every step
through a pinned host buffer and a non-blocking copy, so the loader is inside the
measured step.

For each configuration it runs warm-up steps (compilation included), then timed steps
with a synchronize after each, and reports the median: tokens/s, MFU against the card's
dense bf16 peak, and peak memory. Configurations run in priority order until a time
budget is spent; results are written to --out after each one, so a run cut short still
leaves its numbers.

--recipe picks the network and optimizer: `modern` (tokenmill's default: ReLU², QK-norm,
tied head, Muon: the default recipe) or `gpt2` (GPTConfig's defaults, fused AdamW).
MFU counts the network's FLOPs (`model.flops_per_token()`); Muon's Newton-Schulz is
reported beside it (`ns_flops_per_step`, `optimizer_ms`, `ns_ms`, `mfu_incl_ns`).
--loss chunked replaces the head matmul + cross-entropy by this file's chunked linear
cross-entropy (--lce torch: torch's `F.linear_cross_entropy`, torch >= 2.13), so the
(B*T, vocab) logits never exist whole; --check-loss compares both with `model(x, y)` first.
--configs RECIPE/LOSS ... runs each in its own process (fresh memory and Dynamo state; Inductor's
on-disk cache is shared, so a later child's first step can be shorter) and collects them in
--out. The device run (about 4-5 minutes expected on an H200, compiles included):

    PYTHONUNBUFFERED=1 timeout 450 python3 benchmarks/gpu_train.py --configs modern/plain \
        gpt2/plain modern/chunked gpt2/chunked --batches 64 --no-eager --check-loss \
        --budget-s 300 --out $OUT/gpu.json

Other uses:

    PYTHONUNBUFFERED=1 python benchmarks/gpu_train.py --out gpu.json   # batch sweep, modern
    python benchmarks/gpu_train.py --device cpu --preset tiny --seq 64 --steps 3 \
        --batches 2 4 --no-compile            # a smoke test without a GPU
    python benchmarks/gpu_train.py --batches 64 --no-eager --recipe gpt2 \
        --model-file old/gpt.py --out old.json  # time an older copy of the network
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.shapes import gpt_config  # noqa: E402
from model import GPTConfig  # noqa: E402
from tasks.core.shards import ShardSet, write_shard  # noqa: E402

GPT2_VOCAB = 50257  # tokens are drawn from GPT-2's real vocabulary...
PADDED_VOCAB = 50304  # ...while the embedding is padded to a multiple of 128
IGNORE = -1  # the target id model(x, y) leaves out of the loss

# Each recipe: the GPTConfig fields it sets and the configure_optimizer options it passes.
RECIPES = {
    # GPTConfig's defaults and fused AdamW: the network every run before the modern recipe had.
    "gpt2": ({}, {}),
    # tokenmill's default (tokenmill/presets.yaml): AdamW keeps lr for the embedding and gains.
    "modern": (
        {"mlp": "relu2", "qk_norm": True, "tie_embeddings": True, "zero_init_proj": False},
        {"optimizer": "muon", "muon_lr": 0.01, "muon_momentum": 0.95},
    ),
}
LOSSES = ("plain", "chunked")
# torch >= 2.13 has a chunked linear + cross-entropy; the device machine's 2.11 may not.
HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")

# Dense bf16 tensor-core peaks (vendor datasheets, without sparsity), TFLOP/s.
# Checked in order: the first substring found in the device name wins.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.5),  # SXM, which reports itself as "NVIDIA H100 80GB HBM3"
    ("H200", 989.5),  # same GH100 compute as the H100 SXM
    ("H800", 989.5),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
]


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


# ---------------------------------------------------------------- data


def make_shards(root: Path, n_rows: int, row_len: int, n_shards: int, seed: int) -> Path:
    """Random uint16 rows in [0, GPT2_VOCAB) split over n_shards, plus a manifest."""
    rng = np.random.default_rng(seed)
    entries = []
    for i, part in enumerate(np.array_split(np.arange(n_rows), n_shards)):
        rows = rng.integers(0, GPT2_VOCAB, size=(len(part), row_len), dtype=np.uint16)
        name = f"train-{i:05d}.arrow"
        write_shard(root / name, rows, {"synthetic": "1"})
        entries.append({"path": name, "split": "train", "rows": len(part)})
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"row_len": row_len, "shards": entries}))
    return manifest


class Feeder:
    """Random batches from a ShardSet, staged in pinned memory, copied without blocking.

    Two host buffers alternate so the next batch is never written into memory that a
    copy still in flight is reading.
    """

    def __init__(self, shards: ShardSet, batch: int, device: torch.device, seed: int):
        self.shards, self.batch, self.device = shards, batch, device
        self.rng = np.random.default_rng(seed)
        pin = device.type == "cuda"
        self.host = [torch.empty((batch, shards.row_len), dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self.turn = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        buf = self.host[self.turn]
        self.turn ^= 1
        idx = self.rng.integers(0, len(self.shards), size=self.batch)
        buf.numpy()[:] = self.shards.rows(idx)
        rows = buf.to(self.device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]


def bench_loader(shards: ShardSet, batch: int, device: torch.device, seconds: float) -> dict:
    """Rows/s of the loader alone: ShardSet gather into pinned memory, then the copy."""
    feeder = Feeder(shards, batch, device, seed=1)
    host_only, with_copy = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2:
        buf = feeder.host[0]
        buf.numpy()[:] = shards.rows(feeder.rng.integers(0, len(shards), size=batch))
        host_only += batch
    host_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2:
        feeder.next()
        with_copy += batch
    sync(device)
    copy_s = time.perf_counter() - t0
    return {"batch": batch, "rows_per_s_host": host_only / host_s, "rows_per_s_to_device": with_copy / copy_s}


# ---------------------------------------------------------------- training steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def model_module(path: Path | None):
    """The module that defines GPT: model/gpt.py, or a copy of it given by --model-file.

    A copy lets one device call time an older and a newer network side by side.
    """
    if path is None:
        return sys.modules["model.gpt"]
    spec = importlib.util.spec_from_file_location(f"bench_model_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_model(args, device: torch.device, recipe: str):
    """GPT at the preset's shape with the recipe's architecture, seeded, on device."""
    gpt = model_module(args.model_file)
    arch, _ = RECIPES[recipe]
    cfg = gpt_config(gpt.GPTConfig, args.preset, vocab_size=args.vocab, block_size=args.seq, **arch)
    torch.manual_seed(0)
    with torch.device(device):
        return gpt.GPT(cfg)


def build(args, device: torch.device, compile_mode: str | None):
    """Model, optimizer, and `grads(x, y)`: forward, backward and clipping, returning the loss."""
    model = make_model(args, device, args.recipe)
    opt = model.configure_optimizer(0.1, 6e-4, (0.9, 0.95), device.type, **RECIPES[args.recipe][1])
    forward = loss_forward(model, args, compile_mode)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def grads(x, y):
        with autocast:
            loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        return loss

    return model, opt, grads


def loss_forward(model, args, compile_mode: str | None):
    """`forward(x, y)` -> mean loss: model(x, y) for --loss plain, else features + chunked loss.

    plain compiles the module itself, as every earlier run here did, so its figures compare.
    """
    if args.loss == "plain":
        net = model if compile_mode is None else torch.compile(model, mode=compile_mode, dynamic=False)

        def forward(x, y):
            return net(x, y)[1]

        return forward
    _, head_loss = chunked_loss(args.lce)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    def forward(x, y):
        h = model.features(x)  # (B, T, C)
        return head_loss(h.reshape(-1, h.size(-1)), model.lm_head.weight, y.reshape(-1), args.loss_chunk, dtype)

    return forward if compile_mode is None else torch.compile(forward, mode=compile_mode, dynamic=False)


def run_steps(step, feeder: Feeder, device: torch.device, n: int) -> tuple[list[float], list]:
    """n steps, each timed from fetching its batch to a synchronize after the update."""
    times, losses = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        x, y = feeder.next()
        losses.append(step(x, y).detach())
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, losses


def bench_config(args, shards, device, batch: int, compile_mode: str | None, peak) -> dict:
    """Warm up, time, and summarise one (batch, compile mode) configuration."""
    free_memory(device)
    model, opt, grads = build(args, device, compile_mode)

    def step(x, y):
        loss = grads(x, y)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    feeder = Feeder(shards, batch, device, seed=batch)
    warm, warm_losses = run_steps(step, feeder, device, args.warmup)
    times, losses = run_steps(step, feeder, device, args.steps)
    med = statistics.median(times)
    tokens_per_s = batch * args.seq / med
    flops = model.flops_per_token()
    ns = ns_flops(opt)
    result = {
        "batch": batch,
        "compile": compile_mode or "eager",
        "seq": args.seq,
        "recipe": args.recipe,
        "loss": args.loss,
        "loss_impl": chunked_loss(args.lce)[0] if args.loss == "chunked" else "model(x, y)",
        "optimizer": type(opt).__name__,
        "first_step_s": warm[0],
        "warmup_s": sum(warm),
        "step_s_median": med,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops,
        "tflops": flops * tokens_per_s / 1e12,
        "mfu": flops * tokens_per_s / (peak * 1e12) if peak else None,
        "ns_flops_per_step": ns,
        "tflops_incl_ns": (flops * batch * args.seq + ns) / med / 1e12,
        "mfu_incl_ns": (flops * batch * args.seq + ns) / med / (peak * 1e12) if peak else None,
        "loss_first": float(warm_losses[0]),
        "loss_last": float(losses[-1]),
        "params": model.num_params(),
    }
    result.update(time_optimizer(grads, opt, feeder, device))
    if result.get("ns_ms"):
        result["ns_tflops"] = ns / (result["ns_ms"] / 1e3) / 1e12
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        if args.profile:
            result["profile"] = profile_steps(step, feeder, device, batch * args.seq, model, ns)
    return result


# ---------------------------------------------------------------- the optimizer's share


def ns_flops(opt) -> int:
    """Newton-Schulz FLOPs of one Muon step, counted from the shapes (0 for AdamW).

    Per orthogonalised (m, n) part with m <= n (q, k and v are three (C, C) parts) and per
    iteration: X X^T is 2 m^2 n, gram @ gram 2 m^3, and (b gram + c gram^2) @ X 2 m^2 n.
    """
    total = 0
    for group in opt.param_groups:
        if not group.get("muon"):
            continue
        for p in group["params"]:
            rows, cols = p.shape
            m, n = sorted((rows // group["split"], cols))
            total += group["split"] * group["ns_steps"] * (4 * m * m * n + 2 * m**3)
    return total


def time_optimizer(grads, opt, feeder: Feeder, device: torch.device, n: int = 5) -> dict:
    """Median ms of opt.step() alone, synchronized on both sides, over n fresh gradients.

    For Muon also the median ms of the Newton-Schulz iterations alone, run on its momentum
    buffers exactly as its step runs them. These steps come after the timed ones.
    """
    times = []
    for _ in range(n):
        x, y = feeder.next()
        grads(x, y)
        sync(device)
        t0 = time.perf_counter()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
        opt.zero_grad(set_to_none=True)
    out = {"optimizer_ms": 1e3 * statistics.median(times)}
    muon = [g for g in opt.param_groups if g.get("muon")]
    if muon:
        from model.optim import orthogonalize

        runs = []
        for _ in range(4):
            sync(device)
            t0 = time.perf_counter()
            for group in muon:  # as Muon.step does it: each group's same-shaped matrices in one batch
                buffers = [opt.state[p]["momentum_buffer"] for p in group["params"] if p in opt.state]
                orthogonalize(buffers, group["split"], group["ns_steps"], opt.ns_dtype)
            sync(device)
            runs.append(time.perf_counter() - t0)
        out["ns_ms"] = 1e3 * statistics.median(runs[1:])  # the first run warms up
    return out


# ---------------------------------------------------------------- the chunked loss


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits h @ weight^T (N, V), computed `chunk` rows at a time.

    Each chunk's logits are made in `dtype` (the autocast dtype), their log-softmax in float32,
    and the chunk's gradients at once (as Liger's fused linear cross-entropy does), so neither
    the (N, V) logits nor their gradient ever exist whole; backward only scales the stored
    gradients. Targets equal to IGNORE count for nothing, as in model(x, y).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, dtype: torch.dtype):
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            n_kept = (targets != IGNORE).sum().clamp(min=1)
            loss = h.new_zeros((), dtype=torch.float32)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            grad_h = []
            for start in range(0, h.size(0), chunk):
                hc, yc = h[start : start + chunk].to(dtype), targets[start : start + chunk]
                keep = (yc != IGNORE).unsqueeze(1)  # (n, 1)
                yc = yc.clamp(min=0).unsqueeze(1)  # (n, 1)
                logits = (hc @ w.T).float()  # (n, V): the only logits alive at a time
                lse = torch.logsumexp(logits, dim=1, keepdim=True)  # (n, 1)
                loss = loss + ((lse - logits.gather(1, yc)) * keep).sum()
                # d(mean loss)/d(logits) = (softmax - one_hot(target)) / n_kept on kept rows
                g = logits.sub_(lse).exp_().scatter_add_(1, yc, -torch.ones_like(lse))
                g = g.mul_(keep / n_kept).to(dtype)
                grad_h.append(g @ w)  # (n, C)
                grad_w += (g.T @ hc).float()  # (V, C)
        ctx.save_for_backward(torch.cat(grad_h).to(h.dtype), grad_w)
        return loss / n_kept

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss, None, None, None


def own_linear_cross_entropy(h, weight, targets, chunk: int, dtype: torch.dtype):
    """Mean cross-entropy of h (N, C) @ weight (V, C)^T against targets (N,), chunked."""
    return ChunkedLinearCrossEntropy.apply(h, weight, targets, chunk, dtype)


def torch_linear_cross_entropy(h, weight, targets, chunk: int, dtype: torch.dtype):
    """The same through torch's chunked F.linear_cross_entropy (it picks its own chunk size)."""
    options = torch.nn.LinearCrossEntropyOptions()
    return F.linear_cross_entropy(h.to(dtype), weight.to(dtype), targets, ignore_index=IGNORE, options=options)


def chunked_loss(lce: str):
    """(name, function) of the chunked loss --lce names.

    Ours is the default. torch 2.13's chunked F.linear_cross_entropy (CPU, bf16) returned its
    mean in bf16, summed in bf16: 8.0 against 10.83 over 2048 rows, though its gradients
    matched; --check-loss measures it wherever the torch has it.
    """
    if lce == "torch" and not HAS_TORCH_LCE:
        raise SystemExit(f"torch {torch.__version__} has no chunked F.linear_cross_entropy; use --lce own")
    if lce == "torch":
        return "torch.nn.functional.linear_cross_entropy", torch_linear_cross_entropy
    return "ChunkedLinearCrossEntropy (this file)", own_linear_cross_entropy


def grad_of(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.float()


def check_loss(args, device: torch.device, batch: int = 4) -> dict:
    """Each chunked loss against model(x, y), eager: loss within 1e-3 and gradients close.

    At the benchmark's shape and dtype, on `batch` rows with a few targets ignored and a chunk
    size that leaves a short last chunk. Both recipes: the modern one's zero-init projections
    leave most hidden weights without a gradient at the first step.
    """
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    grad_tol = 2e-2 if args.dtype == "bf16" else 1e-4  # bf16 matmuls round each gradient
    rows = torch.randint(
        0, min(GPT2_VOCAB, args.vocab), (batch, args.seq + 1), generator=torch.Generator().manual_seed(0)
    )
    rows = rows.to(device)
    x, y = rows[:, :-1], rows[:, 1:].clone()
    y[0, :7] = IGNORE
    chunk = batch * args.seq // 3 + 1
    impls = {"own": own_linear_cross_entropy}
    if HAS_TORCH_LCE:
        impls["torch"] = torch_linear_cross_entropy
    cases = []
    for recipe in RECIPES:
        model = make_model(args, device, recipe)
        with autocast:
            ref = model(x, y)[1]
        ref.backward()
        ref_grads = {name: grad_of(p) for name, p in model.named_parameters()}
        for impl, head_loss in impls.items():
            model.zero_grad(set_to_none=True)
            with autocast:
                h = model.features(x)
                loss = head_loss(h.reshape(-1, h.size(-1)), model.lm_head.weight, y.reshape(-1), chunk, dtype)
            loss.backward()
            grad_diff = max(
                float((grad_of(p) - ref_grads[name]).norm() / ref_grads[name].norm().clamp(min=1e-30))
                for name, p in model.named_parameters()
            )
            loss_diff = abs(loss.item() - ref.item())
            case = {"recipe": recipe, "impl": impl, "loss_ref": float(ref), "loss_diff": loss_diff}
            case.update(max_rel_grad_diff=grad_diff, ok=loss_diff <= 1e-3 and grad_diff <= grad_tol)
            cases.append(case)
            print(f"loss check: {json.dumps(case)}", flush=True)
        del model
        free_memory(device)
    return {
        "rows": batch * args.seq,
        "chunk": chunk,
        "grad_tol": grad_tol,
        "cases": cases,
        "ok": {impl: all(c["ok"] for c in cases if c["impl"] == impl) for impl in impls},
    }


# ---------------------------------------------------------------- where the time goes


def kernel_kind(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "cudnn", "attention", "sdpa")):
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "gemv")):
        return "matmul"
    if "adam" in n or "multi_tensor" in n or "foreach" in n:
        return "optimizer+clip"
    if n.startswith("triton"):
        return "fused (triton)"
    if "memcpy" in n or "memset" in n:
        return "copy/memset"
    return "other"


def profile_steps(step, feeder, device, tokens_per_step: int, model, ns_flops_per_step: int, n: int = 3) -> dict:
    """GPU time per kernel kind over n steps, and the matmul rate that implies.

    Muon's Newton-Schulz matmuls land in "matmul", so their FLOPs count in the rate.
    """
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            run_steps(step, feeder, device, n)
            wall = time.perf_counter() - t0
        by_kind, top = {}, []
        for ev in prof.key_averages():
            us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
            if us <= 0:
                continue
            by_kind[kernel_kind(ev.key)] = by_kind.get(kernel_kind(ev.key), 0.0) + us / 1e6
            top.append((us / 1e6 / n, ev.key[:90]))
        top.sort(reverse=True)
        gpu_s = sum(by_kind.values())
        cfg = model.config
        weight_flops = 6 * (model.num_params(non_embedding=True) + cfg.vocab_size * cfg.n_embd)
        mm_s = by_kind.get("matmul", 0.0) / n
        return {
            "wall_s_per_step": wall / n,
            "gpu_busy_s_per_step": gpu_s / n,
            "share": {k: v / gpu_s for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "matmul_tflops": (weight_flops * tokens_per_step + ns_flops_per_step) / mm_s / 1e12 if mm_s else None,
            "top_kernels": [{"s_per_step": s, "name": k} for s, k in top[:15]],
        }
    except Exception as exc:  # the profile is a diagnostic; never let it sink the bench
        return {"error": repr(exc)}


def matmul_ceiling(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """bf16 n x n x n matmul rate on random data, TFLOP/s (the achievable ceiling)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def sdpa_backends(device: torch.device, batch: int, seq: int, n_head: int, head_dim: int) -> dict:
    """Forward+backward ms of causal SDPA per backend on the model's attention shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (
        torch.randn(batch, n_head, seq, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    out = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                for i in range(8):
                    if i == 3:
                        sync(device)
                        t0 = time.perf_counter()
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
                sync(device)
            out[backend.name] = (time.perf_counter() - t0) / 5 * 1e3
        except Exception as exc:
            out[backend.name] = f"unavailable: {type(exc).__name__}"
    return out


# ---------------------------------------------------------------- driver


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": sys.version.split()[0], "device": str(device)}
    env["torch_linear_cross_entropy"] = HAS_TORCH_LCE
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            name=torch.cuda.get_device_name(device),
            sms=props.multi_processor_count,
            mem_gib=props.total_memory / 2**30,
            cuda=torch.version.cuda,
            flash_sdp=torch.backends.cuda.flash_sdp_enabled(),
            cudnn_sdp=getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)(),
        )
        try:
            env["nvidia_smi"] = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except Exception as exc:
            env["nvidia_smi"] = repr(exc)
    return env


def plan(args) -> list[tuple[str, int | None]]:
    """Work items in priority order: compiled sweep, eager at the best batch, the rest."""
    items = [("compiled", b) for b in args.batches]
    if not args.no_eager:
        items.insert(min(len(items), args.eager_after), ("eager", None))
    return items


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def parse_args(argv=None) -> argparse.Namespace:
    # No abbreviations: --configs passes the command line on to its children minus its own flags.
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--device", default="cuda")
    p.add_argument("--recipe", choices=list(RECIPES), default="modern")
    p.add_argument("--loss", choices=LOSSES, default="plain", help="chunked: linear + cross-entropy by row chunks")
    p.add_argument(
        "--lce",
        choices=["own", "torch"],
        default="own",
        help="chunked loss: this file's, or torch's F.linear_cross_entropy (torch >= 2.13; its bf16 mean is "
        "accumulated in bf16, see chunked_loss)",
    )
    p.add_argument("--loss-chunk", type=int, default=8192, help="rows per chunk of this file's chunked loss")
    p.add_argument("--check-loss", action="store_true", help="first compare the chunked loss with model(x, y)")
    p.add_argument(
        "--configs",
        nargs="+",
        default=None,
        metavar="RECIPE/LOSS",
        help="run each, e.g. modern/plain gpt2/chunked, in its own process; results go to --out",
    )
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab", type=int, default=PADDED_VOCAB)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128, 8])
    p.add_argument(
        "--eager-after", type=int, default=3, help="run the eager comparison after this many compiled batch sizes"
    )
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--no-eager", action="store_true", help="skip the eager comparison")
    p.add_argument("--profile", action="store_true", default=None)
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument(
        "--model-file", type=Path, default=None, help="take GPT from this copy of model/gpt.py (default: the package's)"
    )
    p.add_argument(
        "--inductor",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="set torch._inductor.config options first, e.g. coordinate_descent_tuning=True",
    )
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--budget-s", type=float, default=270.0, help="start no new configuration after this many seconds")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.configs:
        return drive(args, argv)
    device = torch.device(args.device)
    if args.profile is None:
        args.profile = device.type == "cuda"
    # No fp32 matmuls should remain under bf16 autocast; TF32 covers any that do.
    torch.set_float32_matmul_precision("high")
    apply_inductor_options(args.inductor)
    t_start = time.perf_counter()
    report = {
        "env": environment(device),
        "args": {k: str(v) for k, v in vars(args).items()},
        "configs": [],
        "skipped": [],
    }
    name = report["env"].get("name", "")
    peak = peak_tflops(name, args.peak_tflops)
    report["env"]["peak_bf16_tflops"] = peak
    print(f"device {name or device}  torch {torch.__version__}  peak {peak} TFLOP/s", flush=True)
    if device.type == "cuda":
        report["env"]["matmul_tflops_8192"] = matmul_ceiling(device)
        print(f"bf16 8192^3 matmul: {report['env']['matmul_tflops_8192']:.0f} TFLOP/s", flush=True)
    if args.check_loss:
        report["loss_check"] = check_loss(args, device)
        save(args.out, report)

    with tempfile.TemporaryDirectory() as tmp:
        n_rows = max(4096, 2 * max(args.batches) * (args.warmup + args.steps + 4))
        manifest = make_shards(Path(tmp), n_rows, args.seq + 1, n_shards=4, seed=0)
        shards = ShardSet.open(manifest, "train")
        report["loader"] = bench_loader(shards, max(args.batches), device, seconds=2.0)
        print(f"loader: {report['loader']}", flush=True)
        sweep(args, shards, device, peak, report, t_start)
        save(args.out, report)
    summarise(report)
    return 0


def apply_inductor_options(assignments: list[str]) -> None:
    """Set Inductor config fields named KEY=VALUE (value parsed as a Python literal)."""
    import ast

    import torch._inductor.config as inductor

    for item in assignments:
        key, _, raw = item.partition("=")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        target = inductor
        *parents, leaf = key.split(".")
        for part in parents:
            target = getattr(target, part)
        if not hasattr(target, leaf):
            raise SystemExit(f"unknown inductor option {key}")
        setattr(target, leaf, value)
        print(f"inductor {key} = {value!r}", flush=True)


def sweep(args, shards, device, peak, report: dict, t_start: float) -> None:
    """Run the plan until the budget is spent; stop growing the batch at the first OOM."""
    compile_mode = None if args.no_compile else args.compile_mode
    oom_at = None
    for kind, batch in plan(args):
        if kind == "eager":
            if compile_mode is None:
                continue
            batch = None  # chosen inside run_eager from the compiled results
        elif oom_at is not None and batch >= oom_at:
            report["skipped"].append({"batch": batch, "why": f"batch {oom_at} ran out of memory"})
            continue
        if time.perf_counter() - t_start > args.budget_s:
            report["skipped"].append({"batch": batch, "kind": kind, "why": "time budget spent"})
            continue
        if kind == "eager":
            run_eager(args, shards, device, peak, report)
            continue
        result = attempt(args, shards, device, batch, compile_mode, peak, report)
        if result.get("error") == "out of memory":
            oom_at = batch if oom_at is None else min(oom_at, batch)
    if device.type == "cuda" and report["configs"]:
        best = max(report["configs"], key=lambda c: c.get("tokens_per_s", 0))
        cfg = gpt_config(GPTConfig, args.preset, vocab_size=args.vocab, block_size=args.seq)
        report["sdpa_ms_fwd_bwd"] = sdpa_backends(device, best["batch"], args.seq, cfg.n_head, cfg.n_embd // cfg.n_head)
    report["elapsed_s"] = time.perf_counter() - t_start


def run_eager(args, shards, device, peak, report: dict) -> None:
    """Eager at the fastest compiled batch; if that runs out of memory, the next smaller."""
    ran = sorted((c for c in report["configs"] if "error" not in c), key=lambda c: -c["tokens_per_s"])
    best = ran[0]["batch"] if ran else None
    for batch in sorted({c["batch"] for c in ran if c["batch"] <= (best or 0)}, reverse=True):
        if attempt(args, shards, device, batch, None, peak, report).get("error") != "out of memory":
            return


def attempt(args, shards, device, batch: int, mode: str | None, peak, report: dict) -> dict:
    """One configuration; an OOM or other failure is recorded, not raised."""
    try:
        result = bench_config(args, shards, device, batch, mode, peak)
    except Exception as exc:
        error = "out of memory" if is_oom(exc) else repr(exc)[:500]
        if error != "out of memory":
            traceback.print_exc()
        result = {"batch": batch, "compile": mode or "eager", "recipe": args.recipe, "loss": args.loss, "error": error}
    free_memory(device)
    report["configs"].append(result)
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}), flush=True)
    save(args.out, report)
    return result


def save(path: Path | None, report: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str))


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_table(configs: list[dict]) -> None:
    """One line per configuration: throughput, MFU without and with Newton-Schulz, time, memory."""
    print(
        f"{'recipe/loss':>15} {'batch':>5} {'mode':>8} {'tok/s':>9} {'MFU':>6} {'+NS':>6} {'step ms':>8} "
        f"{'opt ms':>7} {'NS ms':>6} {'peak GiB':>8} {'1st s':>6} {'loss 1st':>8}"
    )
    for c in configs:
        label = f"{c.get('recipe', '?')}/{c.get('loss', '?')}"
        if "error" in c:
            print(f"{label:>15} {c['batch']:>5} {c['compile']:>8}  {c['error']}")
            continue
        mem = f"{c['peak_mem_gib']:.1f}" if "peak_mem_gib" in c else "-"
        ns = f"{c['ns_ms']:.1f}" if "ns_ms" in c else "-"
        print(
            f"{label:>15} {c['batch']:>5} {c['compile']:>8} {c['tokens_per_s']:>9.0f} {pct(c['mfu']):>6} "
            f"{pct(c['mfu_incl_ns']):>6} {1e3 * c['step_s_median']:>8.1f} {c['optimizer_ms']:>7.1f} {ns:>6} "
            f"{mem:>8} {c['first_step_s']:>6.1f} {c['loss_first']:>8.4f}"
        )


def print_loss_check(check: dict) -> None:
    for c in check["cases"]:
        print(
            f"loss check {c['recipe']}/{c['impl']}: loss {c['loss_ref']:.4f}, diff {c['loss_diff']:.1e}, "
            f"max relative gradient diff {c['max_rel_grad_diff']:.1e} -> {'ok' if c['ok'] else 'FAILED'}"
        )


def summarise(report: dict) -> None:
    env = report["env"]
    print(
        f"\n== {env.get('name', env['device'])}  torch {env['torch']}  "
        f"peak {env.get('peak_bf16_tflops')}  matmul {env.get('matmul_tflops_8192', 0):.0f} TFLOP/s"
    )
    print_table(report["configs"])
    if "loss_check" in report:
        print_loss_check(report["loss_check"])
    ok = [c for c in report["configs"] if "error" not in c and c["compile"] != "eager"]
    if ok:
        best = max(ok, key=lambda c: c["tokens_per_s"])
        print(f"largest micro-batch that ran (compiled): {max(c['batch'] for c in ok)}")
        if "ns_ms" in best:
            print(
                f"Newton-Schulz: {best['ns_flops_per_step'] / 1e12:.2f} TFLOP/step, "
                f"{best['ns_ms']:.1f} ms alone ({best['ns_tflops']:.0f} TFLOP/s); "
                f"optimizer step {best['optimizer_ms']:.1f} ms of a {1e3 * best['step_s_median']:.1f} ms step"
            )
        eager = [c for c in report["configs"] if c.get("compile") == "eager" and "error" not in c]
        if eager:
            same = [c for c in ok if c["batch"] == eager[0]["batch"]]
            if same:
                print(
                    f"compiled / eager at batch {eager[0]['batch']}: "
                    f"{same[0]['tokens_per_s'] / eager[0]['tokens_per_s']:.2f}x"
                )
        rows_needed = best["tokens_per_s"] / best["seq"]
        loader = report["loader"]
        print(
            f"loader {loader['rows_per_s_host']:.0f} rows/s host, {loader['rows_per_s_to_device']:.0f} "
            f"to device; training at best consumes {rows_needed:.0f} rows/s "
            f"-> {loader['rows_per_s_to_device'] / rows_needed:.0f}x"
        )
        prof = best.get("profile", {})
        if "share" in prof:
            shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in prof["share"].items())
            print(
                f"GPU time at batch {best['batch']}: {shares}; busy "
                f"{prof['gpu_busy_s_per_step'] / prof['wall_s_per_step']:.0%} of wall; "
                f"matmuls at {prof['matmul_tflops'] or 0:.0f} TFLOP/s"
            )
            for k in prof["top_kernels"][:6]:
                print(f"  {1e3 * k['s_per_step']:7.2f} ms/step  {k['name']}")
    if "sdpa_ms_fwd_bwd" in report:
        print(f"SDPA fwd+bwd ms: {report['sdpa_ms_fwd_bwd']}")
    for s in report["skipped"]:
        print(f"skipped: {s}")
    print(f"elapsed {report.get('elapsed_s', 0):.0f} s")


# ---------------------------------------------------------------- several configurations, one process each


DRIVER_FLAGS = {"--configs", "--check-loss", "--recipe", "--loss", "--budget-s", "--out"}


def child_argv(argv: list[str]) -> list[str]:
    """argv without the flags (and their values) that the driver sets per child: what all share."""
    out, skipping = [], False
    for arg in argv:
        if arg.startswith("--"):
            skipping = arg.split("=")[0] in DRIVER_FLAGS
        if not skipping:
            out.append(arg)
    return out


def drive(args, argv: list[str]) -> int:
    """Each RECIPE/LOSS of --configs in its own process, in order, until --budget-s is spent.

    A child writes OUT's stem.RECIPE-LOSS.json; the combined report is rewritten to --out
    after each child, so a run cut short keeps what finished. The first child also runs
    --check-loss when asked.
    """
    if args.out is None:
        raise SystemExit("--configs needs --out PATH: the combined report goes there")
    jobs = []
    for label in args.configs:
        recipe, _, loss = label.partition("/")
        if recipe not in RECIPES or loss not in LOSSES:
            raise SystemExit(
                f"--configs takes RECIPE/LOSS with RECIPE in {list(RECIPES)}, LOSS in {LOSSES}; got {label!r}"
            )
        jobs.append((recipe, loss))
    t_start = time.perf_counter()
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": [], "skipped": []}
    for i, (recipe, loss) in enumerate(jobs):
        left = args.budget_s - (time.perf_counter() - t_start)
        if left <= 0:
            report["skipped"].append({"config": f"{recipe}/{loss}", "why": "time budget spent"})
            continue
        out = args.out.with_name(f"{args.out.stem}.{recipe}-{loss}.json")
        out.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), *child_argv(argv)]
        cmd += ["--recipe", recipe, "--loss", loss, "--budget-s", f"{left:.0f}", "--out", str(out)]
        cmd += ["--check-loss"] if args.check_loss and i == 0 else []
        print(f"\n==== {recipe}/{loss}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        run = json.loads(out.read_text()) if out.exists() else {"configs": [], "skipped": []}
        run.update(config=f"{recipe}/{loss}", rc=rc, wall_s=time.perf_counter() - t0)
        report["runs"].append(run)
        report["elapsed_s"] = time.perf_counter() - t_start
        save(args.out, report)
    report["elapsed_s"] = time.perf_counter() - t_start
    save(args.out, report)
    summarise_runs(report)
    return 0 if all(r["rc"] == 0 for r in report["runs"]) else 1


def summarise_runs(report: dict) -> None:
    """The children's configurations in one table; each chunked loss against its recipe's plain one."""
    runs = report["runs"]
    if not runs:
        print("no configuration ran")
        return
    env = runs[0].get("env", {})
    print(f"\n==== {env.get('name', env.get('device'))}  torch {env.get('torch')}  peak {env.get('peak_bf16_tflops')}")
    configs = [c for r in runs for c in r["configs"]]
    print_table(configs)
    for r in runs:
        if "loss_check" in r:
            print_loss_check(r["loss_check"])
        if r["rc"] != 0:
            print(f"{r['config']}: exit code {r['rc']}")
    ran = [c for c in configs if "error" not in c]
    for c in ran[1:]:
        # A chunked loss against the plain one of its recipe (same weights, same first batch),
        # anything else against the first configuration.
        same = [b for b in ran if (b["recipe"], b["loss"], b["batch"]) == (c["recipe"], "plain", c["batch"])]
        base = same[0] if c["loss"] != "plain" and same else ran[0]
        line = f"{c['recipe']}/{c['loss']} vs {base['recipe']}/{base['loss']} at batch {c['batch']}: "
        line += f"{c['tokens_per_s'] / base['tokens_per_s']:.3f}x tokens/s"
        if "peak_mem_gib" in c and "peak_mem_gib" in base:
            line += f", peak memory {c['peak_mem_gib'] - base['peak_mem_gib']:+.1f} GiB"
        if base in same:
            line += f", first loss {c['loss_first'] - base['loss_first']:+.1e}"
        print(line)
    for s in report["skipped"]:
        print(f"skipped: {s}")
    print(f"elapsed {report.get('elapsed_s', 0):.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
