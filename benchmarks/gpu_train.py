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

    PYTHONUNBUFFERED=1 python benchmarks/gpu_train.py --out gpu.json
    python benchmarks/gpu_train.py --device cpu --preset tiny --seq 64 --steps 3 \
        --batches 2 4 --no-compile            # a smoke test without a GPU
    python benchmarks/gpu_train.py --batches 64 --no-eager \
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.shapes import gpt_config  # noqa: E402
from model import GPTConfig  # noqa: E402
from tasks.core.shards import ShardSet, write_shard  # noqa: E402

GPT2_VOCAB = 50257  # tokens are drawn from GPT-2's real vocabulary...
PADDED_VOCAB = 50304  # ...while the embedding is padded to a multiple of 128

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


def build(args, device: torch.device, compile_mode: str | None):
    """Model, optimizer and the callable one training step runs."""
    gpt = model_module(args.model_file)
    cfg = gpt_config(gpt.GPTConfig, args.preset, vocab_size=args.vocab, block_size=args.seq)
    torch.manual_seed(0)
    with torch.device(device):
        model = gpt.GPT(cfg)
    opt = model.configure_optimizer(0.1, 6e-4, (0.9, 0.95), device.type)
    fwd = model if compile_mode is None else torch.compile(model, mode=compile_mode, dynamic=False)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step(x, y):
        with autocast:
            _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, step


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
    model, step = build(args, device, compile_mode)
    feeder = Feeder(shards, batch, device, seed=batch)
    warm, warm_losses = run_steps(step, feeder, device, args.warmup)
    times, losses = run_steps(step, feeder, device, args.steps)
    med = statistics.median(times)
    tokens_per_s = batch * args.seq / med
    flops = model.flops_per_token()
    result = {
        "batch": batch,
        "compile": compile_mode or "eager",
        "seq": args.seq,
        "first_step_s": warm[0],
        "warmup_s": sum(warm),
        "step_s_median": med,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops,
        "tflops": flops * tokens_per_s / 1e12,
        "mfu": flops * tokens_per_s / (peak * 1e12) if peak else None,
        "loss_first": float(warm_losses[0]),
        "loss_last": float(losses[-1]),
        "params": model.num_params(),
    }
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        if args.profile:
            result["profile"] = profile_steps(step, feeder, device, batch * args.seq, model)
    return result


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


def profile_steps(step, feeder, device, tokens_per_step: int, model, n: int = 3) -> dict:
    """GPU time per kernel kind over n steps, and the matmul rate that implies."""
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
            "matmul_tflops": weight_flops * tokens_per_step / mm_s / 1e12 if mm_s else None,
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
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
    args = parse_args(argv)
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
    if device.type == "cuda":
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
        result = {"batch": batch, "compile": mode or "eager", "error": error}
    free_memory(device)
    report["configs"].append(result)
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}), flush=True)
    save(args.out, report)
    return result


def save(path: Path | None, report: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str))


def summarise(report: dict) -> None:
    env = report["env"]
    print(
        f"\n== {env.get('name', env['device'])}  torch {env['torch']}  "
        f"peak {env.get('peak_bf16_tflops')}  matmul {env.get('matmul_tflops_8192', 0):.0f} TFLOP/s"
    )
    print(
        f"{'batch':>5} {'mode':>8} {'tok/s':>10} {'MFU':>6} {'TFLOP/s':>8} {'peak GiB':>9} "
        f"{'step ms':>8} {'1st step s':>10}"
    )
    for c in report["configs"]:
        if "error" in c:
            print(f"{c['batch']:>5} {c['compile']:>8}  {c['error']}")
            continue
        mfu = f"{100 * c['mfu']:.1f}%" if c["mfu"] is not None else "-"
        mem = f"{c['peak_mem_gib']:.1f}" if "peak_mem_gib" in c else "-"
        print(
            f"{c['batch']:>5} {c['compile']:>8} {c['tokens_per_s']:>10.0f} {mfu:>6} "
            f"{c['tflops']:>8.1f} {mem:>9} {1e3 * c['step_s_median']:>8.1f} {c['first_step_s']:>10.1f}"
        )
    ok = [c for c in report["configs"] if "error" not in c and c["compile"] != "eager"]
    if ok:
        best = max(ok, key=lambda c: c["tokens_per_s"])
        print(f"largest micro-batch that ran (compiled): {max(c['batch'] for c in ok)}")
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


if __name__ == "__main__":
    raise SystemExit(main())
