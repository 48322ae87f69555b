"""Scale applied from outside the model, as torchtitan's `parallelize_*` does.

`parallelize(model, ...)` takes a finished `GPT` or `GPTClassifier` and wraps it for the
hardware in one fixed order (compile, then FSDP2 or DDP), so `model/` never changes when
the cluster does. The rest are the few collective helpers the loop needs: which rank
this is, gradient sync during accumulation, clipping and a mean across ranks.

Ranks come from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); without it the run
is one process and every helper here is a no-op.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def ranks_from_env() -> Ranks:
    env = os.environ
    return Ranks(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def join_process_group(ranks: Ranks, device: torch.device) -> None:
    """Join the run's process group once (nccl on CUDA, gloo otherwise); one rank needs none."""
    if ranks.world == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
    )


def leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def pick_device(requested: str) -> torch.device:
    """The device a config asks for; "auto" is CUDA, else Apple's MPS, else the CPU."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """One GPU per local rank; CPU ranks share the CPU."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", ranks.local_rank if ranks.world > 1 else torch.cuda.current_device())
    return device


def parallelize(
    model: nn.Module,
    *,
    device: torch.device,
    ranks: Ranks,
    mode: Literal["ddp", "fsdp"] = "ddp",
    compile: bool = False,
) -> nn.Module:
    """Wrap `model` for `ranks`, in the order torchtitan uses; returns the module to train.

    The caller keeps the plain model for its config and FLOPs; the returned module may be
    the same object (one rank) or a wrapper around it.
    """
    # 1. Compile first, in place (`Module.compile`), so state_dict keys stay those of the
    #    plain model and checkpoints load either way. With several ranks each block is
    #    compiled on its own: gradients then leave block by block, and DDP's all-reduce
    #    or FSDP's reduce-scatter overlaps the rest of the backward. One rank compiles the
    #    whole model, which also fuses the head and the loss.
    if compile:
        if ranks.world > 1:
            for block in blocks(model):
                block.compile()
        else:
            model.compile()
    if ranks.world == 1:
        return model
    # 2. FSDP2: shard each block, then the root, which owns the tied embedding/head matrix.
    #    Parameters become DTensors in place; the module is not wrapped.
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (ranks.world,))
        for block in blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    # 3. DDP last, around everything else: it broadcasts rank 0's weights and all-reduces
    #    gradients in buckets as the backward produces them.
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def blocks(model: nn.Module) -> nn.ModuleList:
    """The Transformer blocks of a GPT, or of the GPT backbone of a classifier."""
    return getattr(model, "backbone", model).transformer.h


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (FSDP2 and in-place compile do not wrap)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def grad_sync(model: nn.Module, enabled: bool):
    """Context for one micro-step: gradients are synced across ranks only when `enabled`
    (the last micro-step of an accumulation), so accumulation costs no communication."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return nullcontext() if enabled else model.no_sync()
    if is_fsdp(model):
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (0 disables clipping) and return the total norm as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def mean_across_ranks(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The mean of `values` over ranks (gloo has no AVG, so a sum divided by the world)."""
    if ranks.world == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / ranks.world
