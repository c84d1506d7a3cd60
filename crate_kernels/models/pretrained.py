"""Official checkpoints and our own folders: ``load_official``, ``save_pretrained``, ``from_pretrained``.

``load_official(model, path_or_state_dict)`` reads what the official code wrote — Ma-Lab-Berkeley/CRATE's
``{"state_dict": ...}`` with DataParallel ``module.`` keys, CRATE-α's bare torch ``.pth``, crate-lm's nanoGPT
``{"model": ...}`` (possibly ``_orig_mod.`` from torch.compile) — maps the key layout to ours, and loads strictly. Files
are read with ``torch.load(weights_only=True)`` (or safetensors), never unpickled freely. Everything is checked before
the first tensor is copied, so a checkpoint that does not fit leaves the model untouched and the error lists every
missing key, unexpected key and shape mismatch. Position embeddings trained at another image size are resized
(bicubic on the patch grid, the class token kept), as timm does for ViTs; CRATE-MAE's fixed 2-D sin-cos tables are a
function of the grid, so they are computed afresh for the new one instead.

``save_pretrained(model, folder)`` writes ``config.json`` (the registry name and the overrides) and
``model.safetensors``; ``from_pretrained(folder)`` rebuilds the model from them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crate_kernels.models import crate_lm, crate_mae
from crate_kernels.models.common import pair, resize_pos_embedding
from crate_kernels.models.registry import create_model, model_config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_CONTAINER_KEYS = ("state_dict", "model", "module")  # where training scripts nest the weights
_KEY_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile
_POS_EMBEDDING = re.compile(r"(^|\.)(\w*pos_embed(ding)?)$")

# Key layouts of the official code, each as a converter to ours. Ours equals upstream's for vanilla CRATE and for
# CRATE-α's torch inference code; upstream CRATE-MAE keeps each layer in its own block; crate-lm is nanoGPT-shaped.
LAYOUTS: dict[str, Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "crate_kernels": dict,
    "crate-mae": crate_mae.from_upstream_state_dict,
    "crate-lm": crate_lm.from_upstream_state_dict,
}


@dataclass
class LoadReport:
    """What ``load_official`` loaded: the source, the key layout it recognised, the tensors it resized."""

    source: str
    layout: str
    num_tensors: int
    interpolated: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    regenerated: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"loaded {self.num_tensors} tensors from {self.source} (layout {self.layout!r})"]
        lines += [f"  resized {k}: {tuple(a)} -> {tuple(b)}" for k, (a, b) in self.interpolated.items()]
        lines += [
            f"  regenerated {k} (fixed sin-cos table) for the new grid: {tuple(a)} -> {tuple(b)}"
            for k, (a, b) in self.regenerated.items()
        ]
        return "\n".join(lines)


# --- reading --------------------------------------------------------------------------------------------------------


def _read(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"path_or_state_dict: no checkpoint file at {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"path_or_state_dict: {str(path)!r} is not a readable safetensors file ({e})") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the restricted unpickler fails on corrupt bytes with IndexError, KeyError, EOFError, ...
        # weights_only errors run on for a page; the unpickler's own line names the object it refused
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
        reason = next((line for line in lines if line.startswith("WeightsUnpickler error")), lines[0])
        raise ValueError(
            f"path_or_state_dict: cannot read {str(path)!r} with torch.load(weights_only=True): "
            f"{type(e).__name__}: {reason.partition('. ')[0]}. If you trust the file, load it yourself and pass "
            "the state dict."
        ) from e


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any) -> dict[str, torch.Tensor]:
    """Descend through ``state_dict`` / ``model`` / ``module`` containers to the tensors; strip key prefixes."""
    path = []
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        key = next((k for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            inner = f" under {'/'.join(path)}" if path else ""
            raise ValueError(
                f"path_or_state_dict: no state dict{inner}: expected a mapping of tensors or a container with one of "
                f"{_CONTAINER_KEYS}, got keys {sorted(map(str, obj))[:12]}"
            )
        path.append(key)
        obj = obj[key]
    if not _is_state_dict(obj):
        raise TypeError(f"path_or_state_dict must hold a mapping of name -> tensor, got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        while key.startswith(_KEY_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


# --- matching ---------------------------------------------------------------------------------------------------------


def _fill_tied(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    """A tied parameter appears under several names in ``target``; a file may store it once (safetensors does)."""
    groups: dict[tuple, list[str]] = {}
    for key, t in target.items():
        if t.numel() == 0:  # empty tensors may all report the same address
            continue
        groups.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(key)
    for names in groups.values():
        present = [n for n in names if n in state]
        if present and len(names) > 1:
            for n in names:
                state.setdefault(n, state[present[0]])


def _target_grid(model: nn.Module, num_patches: int) -> tuple[int, int]:
    """The model's patch grid (from ``image_size`` / ``patch_size`` when it has them), else a square one."""
    image, patch = getattr(model, "image_size", None), getattr(model, "patch_size", None)
    if image is not None and patch is not None:
        (hi, wi), (hp, wp) = pair(image), pair(patch)
        if (hi // hp) * (wi // wp) == num_patches:
            return hi // hp, wi // wp
    side = math.isqrt(num_patches)
    return side, side


def _fixed_sincos_table(model: nn.Module, key: str, src: torch.Tensor) -> bool:
    """Whether ``key`` is a frozen parameter of ``model`` and ``src`` (1, 1 + side², D) the 2-D sin-cos table of its
    square grid (CRATE-MAE's ``pos_embed`` / ``decoder_pos_embed``), to the checkpoint dtype's rounding."""
    param = dict(model.named_parameters(remove_duplicate=False)).get(key)
    if param is None or param.requires_grad or src.shape[2] % 4:
        return False
    side = math.isqrt(src.shape[1] - 1)
    table = crate_mae.sincos_pos_embed_2d(src.shape[2], side, side)[None]
    return torch.allclose(src.float(), table.to(src.dtype).float(), rtol=0, atol=1e-6)


def _resizable(key: str, src: torch.Tensor, dst: torch.Tensor, grid: tuple[int, int]) -> bool:
    if not _POS_EMBEDDING.search(key) or src.dim() != 3 or dst.dim() != 3 or src.shape[0] != 1:
        return False
    side = math.isqrt(src.shape[1] - 1)
    return (
        src.shape[2] == dst.shape[2]
        and side * side == src.shape[1] - 1
        and dst.shape[0] == 1
        and grid[0] * grid[1] == dst.shape[1] - 1
    )


def _mismatch_report(model: nn.Module, layout: str, missing: list, unexpected: list, shapes: list) -> str:
    def listed(title: str, items: list[str]) -> list[str]:
        if not items:
            return []
        shown = items[:12] + ([f"... and {len(items) - 12} more"] if len(items) > 12 else [])
        return [f"  {title} ({len(items)}):"] + [f"    {s}" for s in shown]

    lines = [f"load_official: the checkpoint does not fit {type(model).__name__} (closest key layout {layout!r}); "]
    lines[0] += "nothing was loaded."
    lines += listed("missing from the checkpoint", missing)
    lines += listed("unexpected in the checkpoint", unexpected)
    lines += listed("shape mismatches (checkpoint vs model)", shapes)
    return "\n".join(lines)


def load_official(
    model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, Any], *, interpolate: bool = True
) -> LoadReport:
    """Load an official (or our own) checkpoint into ``model``, strictly, all or nothing.

    Args:
        model: the model to fill, e.g. ``create_model("crate_base_patch16_224")``.
        path_or_state_dict: a ``.pth`` / ``.pt`` / ``.safetensors`` file, or an already loaded object: a state dict,
            or a container holding it under ``state_dict`` / ``model`` / ``module`` (nested containers too). Keys may
            carry ``module.`` (DataParallel / DDP) or ``_orig_mod.`` (torch.compile) prefixes.
        interpolate: resize position embeddings (1, 1 + L, D) of another square patch grid to the model's (a fixed
            sin-cos table is computed for the model's grid instead).

    Returns:
        A :class:`LoadReport`.

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable file, no state dict inside, or keys / shapes that do
            not fit; the model is then unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source, obj = str(path_or_state_dict), _read(Path(path_or_state_dict))
    elif isinstance(path_or_state_dict, Mapping):
        source, obj = "a state dict", path_or_state_dict
    else:
        raise TypeError(f"path_or_state_dict must be a path or a mapping, got {type(path_or_state_dict).__name__}")
    state = _unwrap(obj)
    target = model.state_dict()

    best = None
    for layout, convert in LAYOUTS.items():
        candidate = convert(state)
        _fill_tied(candidate, target)
        overlap = len(candidate.keys() & target.keys())
        if best is None or overlap > best[0]:
            best = (overlap, layout, candidate)
    _, layout, candidate = best

    loaded, interpolated, regenerated, shapes = {}, {}, {}, []
    for key in sorted(candidate.keys() & target.keys()):
        src, dst = candidate[key], target[key]
        if src.shape == dst.shape:
            loaded[key] = src
            continue
        grid = _target_grid(model, dst.shape[1] - 1) if dst.dim() == 3 else (0, 0)
        if interpolate and _resizable(key, src, dst, grid):
            if _fixed_sincos_table(model, key, src):
                loaded[key] = crate_mae.sincos_pos_embed_2d(dst.shape[2], *grid)[None].to(dst.dtype)
                regenerated[key] = (tuple(src.shape), tuple(dst.shape))
            else:
                loaded[key] = resize_pos_embedding(src, grid)
                interpolated[key] = (tuple(src.shape), tuple(dst.shape))
        else:
            shapes.append(f"{key}: {tuple(src.shape)} vs {tuple(dst.shape)}")
    missing = sorted(target.keys() - candidate.keys())
    unexpected = sorted(candidate.keys() - target.keys())
    if missing or unexpected or shapes:
        raise ValueError(_mismatch_report(model, layout, missing, unexpected, shapes))
    model.load_state_dict(loaded, strict=True)
    return LoadReport(source, layout, len(loaded), interpolated, regenerated)


# --- our own folders ------------------------------------------------------------------------------------------------


def save_pretrained(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write ``config.json`` ({"name", "overrides"}) and ``model.safetensors`` (tied tensors stored once).

    ``model`` must come from ``crate_kernels.create_model`` (it keeps ``model.config``) and still match that
    configuration (after ``reset_classifier`` or other surgery the config would rebuild another model: error).
    """
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not isinstance(config, Mapping) or "name" not in config:
        raise ValueError("model must be built by crate_kernels.create_model (it records model.config = {'name', ...})")
    name = config["name"]
    registered = model_config(name)
    overrides = {k: v for k, v in config.items() if k != "name" and (k not in registered or registered[k] != v)}
    with torch.device("meta"):
        rebuilt = create_model(name, **overrides).state_dict()
    actual = model.state_dict()
    differ = sorted(k for k in rebuilt.keys() | actual.keys() if k not in rebuilt or k not in actual
                    or rebuilt[k].shape != actual[k].shape)  # fmt: skip
    if differ:
        raise ValueError(
            f"model.config ({name}, {overrides}) no longer describes this model; it differs at {differ[:6]} "
            "(e.g. after reset_classifier: pass the new size to create_model instead)"
        )
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps({"name": name, "overrides": overrides}, indent=2) + "\n")
    save_model(model, str(folder / WEIGHTS_FILE))
    return folder


def from_pretrained(folder: str | os.PathLike) -> nn.Module:
    """The model ``save_pretrained`` wrote to ``folder``: rebuilt from ``config.json``, weights loaded strictly."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"folder: {str(folder)!r} has no {p.name} (written by save_pretrained)")
    config = json.loads(config_path.read_text())
    if not isinstance(config, dict) or not isinstance(config.get("name"), str):
        raise ValueError(f"{config_path}: expected {{'name': registry name, 'overrides': {{...}}}}, got {config!r}")
    # JSON has no tuples: (h, w) sizes come back as lists
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in config.get("overrides", {}).items()}
    model = create_model(config["name"], **overrides)
    load_official(model, weights_path, interpolate=False)
    return model
