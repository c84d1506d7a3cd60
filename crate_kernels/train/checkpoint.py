"""Atomic, resumable checkpoints: ``DIR/checkpoints/step_<N>/``, the last ``keep_last`` kept.

A checkpoint is written into ``step_<N>.tmp/`` (each file flushed and fsynced), then renamed to ``step_<N>/`` by
rank 0 and the parent directory fsynced: a crash at any point leaves either the old set of checkpoints or the old set
plus a complete new one, never a half-written ``step_<N>/``. Contents:
- ``train.pt`` (rank 0): step, scheduler state, the fp16 ``GradScaler`` state, the data position (epoch and offset
  in its order: ``loader.TrainBatches``), and for ``none``/``ddp`` the full model and optimizer state dicts;
- ``model_optim/`` (``fsdp2``): the sharded model and optimizer state in ``torch.distributed.checkpoint`` format;
- ``rng_rank<r>.pt`` (every rank): python, numpy, torch and CUDA generator states, as tensors and lists.
Everything is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from crate_kernels.train.distributed import Context, barrier

STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": [version, list(internal), gauss],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (``.tmp`` leftovers of a crash are not checkpoints)."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step_*") if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def save(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ctx: Context,
    keep_last: int,
    scaler: torch.amp.GradScaler | None = None,
    data: Any = None,
) -> Path:
    """Write the checkpoint after ``step`` optimizer steps; collective (every rank calls it)."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step:07d}", root / f"step_{step:07d}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
        tmp.mkdir(parents=True)
    barrier(ctx)
    model_state, optim_state = get_state_dict(model, optimizer)
    train_state: dict[str, Any] = {"step": step, "scheduler": scheduler.state_dict()}
    if scaler is not None and scaler.is_enabled():
        train_state["scaler"] = scaler.state_dict()  # its loss scale moves during fp16 training
    if data is not None:
        train_state["data"] = data.state_dict()
    if ctx.parallel == "fsdp2":
        import torch.distributed.checkpoint as dcp

        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp / "model_optim")
    else:
        train_state |= {"model": model_state, "optimizer": optim_state}
    if ctx.is_main:
        _save_file(train_state, tmp / "train.pt")
    _save_file(rng_state(), tmp / f"rng_rank{ctx.rank}.pt")
    barrier(ctx)
    if ctx.is_main:
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    barrier(ctx)
    return final


def load(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ctx: Context,
    scaler: torch.amp.GradScaler | None = None,
    data: Any = None,
) -> int:
    """Restore everything ``save`` wrote into the (already wrapped) model and optimizer; returns the step."""
    train_state = torch.load(path / "train.pt", map_location="cpu", weights_only=True)
    if ctx.parallel == "fsdp2":
        import torch.distributed.checkpoint as dcp

        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=path / "model_optim")
        model_state, optim_state = state["model"], state["optimizer"]
    else:
        model_state, optim_state = train_state["model"], train_state["optimizer"]
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    scheduler.load_state_dict(train_state["scheduler"])
    if scaler is not None and "scaler" in train_state:
        scaler.load_state_dict(train_state["scaler"])
    if data is not None and "data" in train_state:
        data.load_state_dict(train_state["data"])
    rng_file = path / f"rng_rank{ctx.rank}.pt"
    if not rng_file.is_file():
        raise ValueError(f"{str(path)!r} was written by fewer ranks than {ctx.world_size}: no {rng_file.name}")
    set_rng_state(torch.load(rng_file, weights_only=True))
    return int(train_state["step"])


def export_safetensors(model: nn.Module, path: str | Path, ctx: Context) -> None:
    """The full model weights as one safetensors file (rank 0 writes; collective under FSDP2)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if ctx.is_main:
        # clone: tied weights (LM embedding and head) share storage, which safetensors refuses.
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(path))
