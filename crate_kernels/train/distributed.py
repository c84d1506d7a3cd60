"""One process or many: the process group, model wrapping (DDP, FSDP2), gradient-sync control and reductions.

The same command runs under ``torchrun``: ``--parallel ddp`` wraps the model in DDP, ``--parallel fsdp2`` applies
``fully_shard`` to each block of ``model.transformer.layers`` and then to the root (ZeRO-3 style: parameters,
gradients and optimizer state sharded). The global batch is fixed by ``--optim.batch_size``, so every world size
optimises the same loss.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Context:
    parallel: str  # none | ddp | fsdp2
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def world(self) -> tuple[int, int]:
        return self.rank, self.world_size


def setup(parallel: str, device: str) -> Context:
    """Join the process group that ``torchrun`` describes (NCCL on CUDA, gloo on CPU) and pick this rank's device."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel == "none":
        if world_size > 1:
            raise ValueError(f"WORLD_SIZE={world_size} (torchrun) needs --parallel ddp or --parallel fsdp2")
        return Context("none", 0, 1, torch.device("cuda" if use_cuda else "cpu"))
    if "RANK" not in os.environ:
        raise ValueError(f"--parallel {parallel} must run under torchrun (e.g. torchrun --nproc_per_node=2 ...)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    return Context(parallel, rank, dist.get_world_size(), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def teardown(ctx: Context) -> None:
    if ctx.parallel != "none" and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """DDP or FSDP2 around ``model`` (already on ``ctx.device``); the model itself for ``none``."""
    if ctx.parallel == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    if ctx.parallel == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        blocks = getattr(getattr(model, "transformer", None), "layers", [])
        for block in blocks:
            # A CRATE block is upstream's ModuleList [PreNorm(MSSA), PreNorm(ISTA)] (no forward of its own):
            # shard the pair as one unit, gathered once per block.
            fully_shard(list(block) if isinstance(block, nn.ModuleList) else block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if hasattr(model, "generate"):
            from torch.distributed.fsdp import register_fsdp_forward_method

            # The language model samples through generate(), not forward(): its root parameters (embeddings, final
            # norm) must be gathered for it too.
            register_fsdp_forward_method(model, "generate")
    return model


def sync_gradients(model: nn.Module, ctx: Context, sync: bool):
    """Context for one micro-batch's backward: gradients are reduced across ranks only when ``sync`` (the last one)."""
    if ctx.parallel == "ddp" and not sync:
        return model.no_sync()
    if ctx.parallel == "fsdp2":
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def all_reduce(values: torch.Tensor, ctx: Context, op: str = "sum") -> torch.Tensor:
    """Sum (``op`` "sum"), mean or max of ``values`` over ranks; identity on one process."""
    if ctx.parallel == "none":
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return values / ctx.world_size if op == "mean" else values


def all_gather_objects(obj: Any, ctx: Context) -> list[Any]:
    """Every rank's ``obj`` (picklable: our own values, never a file's), in rank order; ``[obj]`` on one process."""
    if ctx.parallel == "none":
        return [obj]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(ctx: Context) -> None:
    if ctx.parallel != "none":
        dist.barrier()
