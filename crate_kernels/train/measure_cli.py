"""``crate-measure`` (``python -m crate_kernels.train.measure_cli``): the per-layer report of a CRATE model.

Prints the table of ``crate_kernels.measure.layerwise`` and writes ``layerwise.json``, ``layerwise.png`` (and, with
``--attention``, ``attention.png``). The model comes from the registry, an official checkpoint file, a
``save_pretrained`` folder or a crate-train run folder; the batch comes from crate-train's own data loaders (the
held-out split, normalised as in training), so a run folder is measured on the data it was trained on.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from crate_kernels import files
from crate_kernels.measure import EPS, attention_maps, layerwise
from crate_kernels.models import create_model, model_config, parse_model_args
from crate_kernels.models.dino import teacher_backbone_state
from crate_kernels.models.pretrained import from_pretrained, load_official
from crate_kernels.plots import format_table, plot_attention_maps, plot_layerwise
from crate_kernels.train.config import TASK_DEFAULTS, DataConfig, from_flat, load_file
from crate_kernels.train.data import load_dataset, photograph
from crate_kernels.train.faults import one_line_errors

DEFAULT_MODEL = "crate_demo"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="crate-measure",
        description="Per-layer compression R^c (lower = more compressed), coding rate and ISTA sparsity (fraction "
        "of zeros, higher = sparser) of a CRATE model, layers numbered 1..L (docs/design.md, 'Measurement "
        "definitions').",
    )
    p.add_argument(
        "--model",
        help=f"registry name (crate_kernels.list_models()). Default: the model a --checkpoint folder names, else "
        f"{DEFAULT_MODEL}. An official checkpoint file needs the name of the model it holds; a folder's config.json "
        "names its model, and a different --model is refused",
    )
    p.add_argument(
        "--model-args",
        default="",
        help="constructor overrides as crate-train's --model-args: name=value pairs of Python literals, e.g. "
        "'num_classes=10' for an official checkpoint fine-tuned to 10 classes. A folder fixes its model's "
        "arguments: a value that differs from it is refused",
    )
    p.add_argument(
        "--checkpoint",
        help="an official checkpoint file (load_official), a save_pretrained folder, or a crate-train run folder",
    )
    p.add_argument(
        "--data",
        help="what crate-train's --data takes (digits | lfw | pydoc | an image folder | CIFAR batches | a text "
        "file); the held-out split is measured. Default: a run folder's own data, else digits (image models) or "
        "pydoc (language models)",
    )
    p.add_argument("--out", default="measure", help="folder for layerwise.json / layerwise.png / attention.png")
    p.add_argument("--batch-size", type=int, default=256, help="held-out samples measured (fewer if the split is)")
    p.add_argument("--seed", type=int, default=0, help="which held-out samples are drawn")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--attention", action="store_true", help="also plot last-layer [CLS] attention on a photograph")
    p.add_argument("--photo", default="astronaut", help="scikit-image sample photograph for --attention")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be positive, got {args.batch_size}")
    return args


class Subject(NamedTuple):
    """What crate-measure measures: the model, where its weights came from, and the data a run folder names."""

    model: nn.Module
    origin: str
    run_data: DataConfig | None = None


def _folder_model(folder: Path) -> Subject:
    """The model of a save_pretrained folder (``config.json`` = {"name", "overrides"}) or of a crate-train run folder
    (its resolved ``config.json`` names the model and the data; the run exports ``model.safetensors`` at the end)."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(
            f"--checkpoint: cannot read {path} ({err}); expected a save_pretrained or run folder"
        ) from None
    if isinstance(config, dict) and isinstance(config.get("name"), str):
        return Subject(from_pretrained(folder), f"from {folder} (save_pretrained)")
    if not (isinstance(config, dict) and isinstance(config.get("model"), dict)):
        raise ValueError(f"--checkpoint: {folder} is neither a save_pretrained folder nor a crate-train run folder")
    run = from_flat(load_file(path)).resolved()  # as crate-train read it
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"--checkpoint: {folder} has no model.safetensors (crate-train writes it at the end)")
    model = create_model(run.model.name, **parse_model_args(run.model.args))
    if run.task.name == "dino":  # the teacher's backbone: what self-distillation keeps
        import safetensors.torch

        model.reset_classifier(0)
        model.load_state_dict(teacher_backbone_state(safetensors.torch.load_file(weights)))
        return Subject(model, f"from {folder} (crate-train --task dino run: the teacher's backbone)", run.data)
    load_official(model, weights)
    return Subject(model, f"from {folder} (crate-train run)", run.data)


def _argument(model: nn.Module, key: str) -> Any:
    """The value the model was built with for constructor argument ``key``."""
    return model.config.get(key, inspect.signature(type(model)).parameters[key].default)


def model_to_measure(name: str | None, model_args: str, checkpoint: str | None) -> Subject:
    """The model ``--model``, ``--model-args`` and ``--checkpoint`` describe. A folder names its own model: a ``name``
    or an argument that contradicts it is refused (its weights were trained for that model)."""
    overrides = parse_model_args(model_args)
    if checkpoint is None or not Path(checkpoint).is_dir():
        name = name or DEFAULT_MODEL
        model = create_model(name, **overrides)
        origin = "random initialisation" if checkpoint is None else str(load_official(model, checkpoint))
        return Subject(model, f"{name}, {origin}")
    folder = Path(checkpoint)
    subject = _folder_model(folder)
    saved = subject.model.config["name"]
    if name is not None and name != saved:
        raise ValueError(
            f"--model {name}: {folder} holds a {saved}; drop --model (a folder names its model) or pass --model {saved}"
        )
    model_config(saved, **overrides)  # unknown or ill-typed arguments: the registry's own error
    differ = [k for k, v in overrides.items() if _argument(subject.model, k) != v]
    if differ:
        had = ", ".join(f"{k}={_argument(subject.model, k)!r}" for k in differ)
        raise ValueError(f"--model-args: {folder} holds a {saved} with {had}; its weights fix these arguments")
    return subject._replace(origin=f"{saved} {subject.origin}")


def data_config(data: str | None, run_data: DataConfig | None, text: bool) -> DataConfig:
    """``--data`` as crate-train reads it, on a run folder's data settings; by default its data, else a demo set."""
    base = run_data or DataConfig(name=TASK_DEFAULTS["lm" if text else "classify"][1])
    return dataclasses.replace(base, name=data) if data else base


def _fit_images(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Images to the model's channel count and size (grey ↔ RGB, bilinear resize)."""
    channels, size = getattr(model, "channels", x.shape[1]), getattr(model, "image_size", tuple(x.shape[-2:]))
    size = (size, size) if isinstance(size, int) else tuple(size)
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1) if channels in (1, 3) else x
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.contiguous()


def load_inputs(model: nn.Module, data: DataConfig, batch_size: int, seed: int = 0) -> torch.Tensor:
    """Up to ``batch_size`` held-out samples of ``data`` the model takes, drawn by ``seed``: token windows of the
    model's ``block_size`` for language models (``vocab_size``), images fitted to the model otherwise."""
    text = hasattr(model, "vocab_size")
    _, held_out = load_dataset(data, text)
    if text:
        held_out.block_size = model.block_size
    if len(held_out) == 0:
        raise ValueError(f"--data: the held-out split of {data.name!r} holds no full sample for this model")
    index = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(seed))[:batch_size]
    x = held_out.batch(index).inputs
    return x if text else _fit_images(x, model)


def main(argv: Sequence[str] | None = None) -> int:
    """``crate-measure``: print the per-layer table, write layerwise.json and layerwise.png (and attention.png).

    Returns the exit status (``faults.one_line_errors``): 0, or one line and 2 for a bad model name, argument,
    checkpoint or data, 1 for a full disk or another I/O error, 130 for Ctrl-C.
    """
    args = _parse_args(argv)
    return one_line_errors("crate-measure", lambda: _measure(args))


def _measure(args: argparse.Namespace) -> None:
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    model, origin, run_data = model_to_measure(args.model, args.model_args, args.checkpoint)
    name = model.config["name"]
    model = model.to(device)
    data = data_config(args.data, run_data, hasattr(model, "vocab_size"))
    inputs = load_inputs(model, data, args.batch_size, args.seed).to(device)
    rows = layerwise(model, inputs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"{origin}\n{inputs.shape[0]} held-out samples of {data.name} of shape {tuple(inputs.shape[1:])}, ε = {EPS}\n"
    )
    print(format_table(rows))
    report = {"model": name, "origin": origin, "data": data.name, "rows": rows}
    written = [files.write_text(out / "layerwise.json", json.dumps(report, indent=2) + "\n")]
    written.append(plot_layerwise({name: rows}, out / "layerwise.png", title=f"{name} on {data.name} (held-out)"))
    if args.attention:
        if not hasattr(model, "cls_token"):
            raise ValueError(f"--attention needs a classifier with a class token; {name} has none")
        photo = photograph(args.photo, 224, getattr(model, "channels", 3))  # shown at 224², fed at the model's size
        x = photo
        if x.shape[1] == 3:  # the ImageNet statistics the official checkpoints were trained with
            x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
        maps = attention_maps(model, _fit_images(x, model).to(device))
        title = f"{name}: [CLS] attention per head, last layer (ℓ = {len(rows)})"
        written.append(plot_attention_maps(maps[0].cpu(), photo[0], out / "attention.png", title))
    print("\nwrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    raise SystemExit(main())
