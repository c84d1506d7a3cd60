"""Atomic, resumable checkpoints: ``DIR/checkpoints/step_<N>/``, the last ``keep_last`` kept.

A checkpoint is written into ``step_<N>.tmp/`` (each file written by ``crate_kernels.files``: fsynced and renamed),
then renamed to ``step_<N>/`` by rank 0 and the parent directory fsynced: a crash at any point leaves either the old
set of checkpoints or the old set plus a complete new one, never a half-written ``step_<N>/``. Contents:
- ``train.pt`` (rank 0): step, scheduler state, the fp16 ``GradScaler`` state, the data position (epoch and offset
  in the training order: ``loader.TrainBatches``), and for ``none``/``ddp`` the full model and optimizer state dicts;
- ``model_optim/`` (``fsdp2``): the sharded model and optimizer state in ``torch.distributed.checkpoint`` format;
- ``rng_rank<r>.pt`` (every rank): python, numpy, torch and CUDA generator states, as tensors and lists.
Nothing is unpickled beyond what torch's weights-only unpickler admits: ``.pt`` files are read with
``torch.load(weights_only=True)``; the DCP folder's ``.metadata`` and its non-tensor entries, which DCP's own reader
unpickles without restriction, go through the same unpickler with DCP's metadata classes allow-listed.

Resuming takes the newest checkpoint that reads back whole; an unreadable one (torn, or refused by the unpickler) is
named and set aside as ``step_<N>.unreadable``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import pickle
import pickletools
import random
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import _weights_only_unpickler, nn
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from crate_kernels import files
from crate_kernels.train import distributed
from crate_kernels.train.distributed import Context, barrier
from crate_kernels.train.faults import RunError

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
    with files.replacing_file(path, "wb") as f:
        torch.save(obj, f)


def step_dir(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint after ``step`` optimizer steps lives."""
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


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
    """Write the checkpoint after ``step`` optimizer steps; collective (every rank calls it).

    A full disk raises ``OSError`` naming the file (on the rank that hit it), the earlier checkpoints untouched.
    """
    final = step_dir(run_dir, step)
    # Rank 0 owns the folder's rename; every rank writes its files into it.
    with files.replacing(final) if ctx.is_main else contextlib.nullcontext(files.temporary(final)) as tmp:
        if ctx.is_main:
            tmp.mkdir(parents=True)
        barrier(ctx)
        model_state, optim_state = get_state_dict(model, optimizer)
        train_state: dict[str, Any] = {"step": step, "scheduler": scheduler.state_dict()}
        if scaler is not None and scaler.is_enabled():
            train_state["scaler"] = scaler.state_dict()  # its loss scale moves during fp16 training
        if data is not None:
            train_state["data"] = data.state_dict()
        if ctx.parallel == "fsdp2":
            try:
                dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp / "model_optim")
            except CheckpointException as err:  # a BaseException: made an error that ``replacing`` cleans up after
                raise RuntimeError(f"torch.distributed.checkpoint.save: {_reason(err)}") from err
        else:
            train_state |= {"model": model_state, "optimizer": optim_state}
        if ctx.is_main:
            _save_file(train_state, tmp / "train.pt")
        _save_file(rng_state(), tmp / f"rng_rank{ctx.rank}.pt")
        barrier(ctx)
    if ctx.is_main:
        for old in checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    barrier(ctx)
    return final


# ---- reading back: weights-only, newest readable first ----

# What torch.distributed.checkpoint pickles into ``.metadata``: its metadata classes, the storage index, the path.
DCP_METADATA_CLASSES = [
    cls for cls in vars(dcp_metadata).values() if inspect.isclass(cls) and cls.__module__ == dcp_metadata.__name__
] + [_StorageInfo, type(Path())]


def _as_protocol_2(data: bytes) -> bytes:
    """The pickle ``data`` (protocol 2 to 5) rewritten with the opcodes of protocol 2, which is all that torch's
    weights-only unpickler reads: frames dropped, ``MEMOIZE`` as ``LONG_BINPUT``, short strings as ``BINUNICODE``,
    ``STACK_GLOBAL`` (module and name taken from the stack) as ``GLOBAL``. Nothing is executed here; other opcodes
    are copied, and the unpickler refuses those it does not know.

    Strings stay pending until the next opcode that is not a string push, so that ``STACK_GLOBAL`` can take its two;
    a memoised string is re-pushed by value wherever the stream fetches it.
    """
    ops = list(pickletools.genops(data))
    out, pending, stored = [pickle.PROTO + b"\x02"], [], 0
    memo: dict[int, str | int] = {}  # the stream's memo index -> a string, or the index in the rewritten stream

    def flush() -> None:
        for text in pending:
            raw = text.encode("utf-8", "surrogatepass")
            out.append(pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw)
        pending.clear()

    for i, (op, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        if op.name in ("PROTO", "FRAME"):
            continue
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"):
            pending.append(arg)
        elif op.name in ("MEMOIZE", "BINPUT", "LONG_BINPUT"):
            index = len(memo) if op.name == "MEMOIZE" else arg
            if pending:  # the top of the stack is the last pending string
                memo[index] = pending[-1]
            else:
                memo[index], stored = stored, stored + 1
                out.append(pickle.LONG_BINPUT + struct.pack("<I", memo[index]))
        elif op.name in ("BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise pickle.UnpicklingError(f"memo index {arg} read before it was written")
            if isinstance(memo[arg], str):
                pending.append(memo[arg])
            else:
                flush()
                out.append(pickle.LONG_BINGET + struct.pack("<I", memo[arg]))
        elif op.name == "STACK_GLOBAL":
            if len(pending) < 2 or any("\n" in name for name in pending[-2:]):
                raise pickle.UnpicklingError("STACK_GLOBAL without a module and a name on the stack")
            module, name = pending[-2:]
            del pending[-2:]
            flush()
            out.append(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        else:
            flush()
            out.append(data[pos:end])
    return b"".join(out)


def weights_only_unpickle(data: bytes, allowed: list[type]) -> Any:
    """Unpickle ``data`` with torch's weights-only unpickler (``torch.load(weights_only=True)``'s), ``allowed`` added
    to the globals it admits; anything else is refused with ``pickle.UnpicklingError`` before it is called."""
    with torch.serialization.safe_globals(allowed):
        return _weights_only_unpickler.load(io.BytesIO(_as_protocol_2(data)))


class _WeightsOnlyReader(FileSystemReader):
    """DCP's file reader with ``.metadata`` unpickled weights-only (tensor entries are ``torch.load``-ed
    weights-only by DCP itself)."""

    def read_metadata(self) -> dcp_metadata.Metadata:
        with self.fs.create_stream(self.fs.concat_path(self.path, ".metadata"), "rb") as f:
            metadata = weights_only_unpickle(f.read(), DCP_METADATA_CLASSES)
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise pickle.UnpicklingError(f".metadata holds a {type(metadata).__name__}, not DCP metadata")
        if metadata.storage_meta is None:  # as DCP's own reader does
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    """DCP's load planner with the non-tensor entries (optimizer hyper-parameters) ``torch.load``-ed weights-only."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_dcp(state: dict[str, Any], path: Path) -> None:
    """``torch.distributed.checkpoint.load(state, path)`` (in place, collective), unpickling weights-only."""
    dcp.load(state, storage_reader=_WeightsOnlyReader(path), planner=_WeightsOnlyPlanner())


# What reading a torn, truncated or hostile checkpoint file raises.
UNREADABLE = (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError)


def _read(path: Path, ctx: Context) -> dict[str, Any]:
    """This rank's files of checkpoint ``path``, read and checked (not yet applied); raises one of ``UNREADABLE``."""
    train_state = torch.load(path / "train.pt", map_location="cpu", weights_only=True)
    expected = ("step", "scheduler") + (() if ctx.parallel == "fsdp2" else ("model", "optimizer"))
    missing = [key for key in expected if key not in train_state]
    if missing or train_state["step"] != int(STEP_DIR.match(path.name).group(1)):
        raise ValueError(f"train.pt lacks {missing} or names another step ({train_state.get('step')})")
    if ctx.parallel == "fsdp2":
        _WeightsOnlyReader(path / "model_optim").read_metadata()  # checked here, so that every rank can agree
    rng = torch.load(path / f"rng_rank{ctx.rank}.pt", weights_only=True)
    return {"train": train_state, "rng": rng}


def _apply(
    path: Path,
    read: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ctx: Context,
    scaler: torch.amp.GradScaler | None,
    data: Any,
) -> int:
    """Restore everything ``save`` wrote into the (already wrapped) model and optimizer; returns the step."""
    train_state = read["train"]
    if ctx.parallel == "fsdp2":
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        load_dcp(state, path / "model_optim")
        model_state, optim_state = state["model"], state["optimizer"]
    else:
        model_state, optim_state = train_state["model"], train_state["optimizer"]
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    scheduler.load_state_dict(train_state["scheduler"])
    if scaler is not None and "scaler" in train_state:
        scaler.load_state_dict(train_state["scaler"])
    if data is not None and "data" in train_state:
        data.load_state_dict(train_state["data"])
    set_rng_state(read["rng"])
    return int(train_state["step"])


def _reason(err: BaseException) -> str:
    """One line saying why a checkpoint could not be read."""
    if isinstance(err, CheckpointException):  # the first rank's own exception, not DCP's multi-line report
        err = next(iter(err.failures.values()))[0]
    # The weights-only unpickler's own message goes on to explain how to load the file unrestricted: not here.
    refused = re.search(r"Unsupported [^.\n]*", str(err)) if isinstance(err, pickle.UnpicklingError) else None
    if refused:
        return f"the weights-only unpickler refused it: {refused.group(0)}"
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:200]}"


def resume(
    run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ctx: Context,
    scaler: torch.amp.GradScaler | None = None,
    data: Any = None,
) -> tuple[int, Path | None]:
    """Restore the newest checkpoint of ``run_dir`` that reads back whole; collective. Returns its step and path
    (0 and None when the run has none yet).

    Each one that cannot be read is named on rank 0 and, once an older one has been restored, set aside as
    ``step_<N>.unreadable`` (so that ``keep_last`` never counts it). ``RunError`` when none can be read, and
    ``ValueError`` when the checkpoints come from fewer processes than this run has.
    """
    found = checkpoints(run_dir)
    written_by = max((len(list(path.glob("rng_rank*.pt"))) for path in found), default=ctx.world_size)
    if written_by < ctx.world_size:  # every rank sees the same files, so every rank stops here
        raise ValueError(
            f"the checkpoints in {str(Path(run_dir))!r} were written by {written_by} process(es), this run has "
            f"{ctx.world_size}: resume with as many (torchrun --nproc_per_node={written_by}) or choose another --out"
        )
    skipped: list[tuple[Path, str]] = []
    for path in reversed(found):
        try:
            read, reason = _read(path, ctx), ""
        except UNREADABLE as err:
            read, reason = None, _reason(err)
        # Every rank moves on to the same checkpoint (the FSDP2 read below is collective).
        if float(distributed.all_reduce(torch.tensor([float(read is None)], device=ctx.device), ctx, op="max")):
            skipped.append((path, reason or "unreadable on another rank"))
            continue
        try:
            step = _apply(path, read, model, optimizer, scheduler, ctx, scaler, data)
        except CheckpointException as err:  # raised on every rank alike
            skipped.append((path, _reason(err)))
            continue
        if ctx.is_main:
            for bad, why in skipped:
                aside = bad.with_name(bad.name + ".unreadable")
                shutil.rmtree(aside, ignore_errors=True)
                bad.rename(aside)
                print(f"warning: checkpoint {bad} is unreadable ({why}); set aside as {aside.name}")
        barrier(ctx)
        return step, path
    if skipped:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise RunError(
            f"no checkpoint in {str(Path(run_dir) / 'checkpoints')!r} can be read ({reasons}); "
            "move them away to start this run again from step 0"
        )
    return 0, None


def export_safetensors(model: nn.Module, path: str | Path, ctx: Context) -> None:
    """The full model weights as one safetensors file (rank 0 writes; collective under FSDP2)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if ctx.is_main:
        # clone: tied weights (LM embedding and head) share storage, which safetensors refuses.
        with files.replacing(path) as tmp:
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(tmp))
