"""Training configuration: frozen dataclasses, a command line generated from them, TOML/JSON files.

Every leaf field is a flag ``--section.field`` (``--optim.lr 1e-3``); top-level fields are ``--field``. Dashes and
underscores are interchangeable (``--max-steps`` = ``--max_steps``). Short aliases: ``--model`` (``--model.name``),
``--model-args`` (``--model.args``), ``--data`` (``--data.name``), ``--task`` (``--task.name``). Precedence:
defaults < ``--config FILE`` < flags. Every value is type-checked against the field's annotation, so a typo or a
wrong type fails before anything is built.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("classify", "mae", "lm", "mlm")
PARALLEL = ("none", "ddp", "fsdp2")
# The model and data each task uses when --model / --data are not given.
TASK_DEFAULTS = {
    "classify": ("crate_demo", "digits"),
    "mae": ("crate_mae_demo", "digits"),
    "lm": ("crate_lm_demo", "pydoc"),
    "mlm": ("crate_mlm_demo", "pydoc"),
}


class ConfigError(ValueError):
    """A run that cannot start (bad flag, unknown model, missing data, batch that does not divide)."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = ""  # a registry name (crate_kernels.list_models()); "" = the task's demo model
    args: str = ""  # constructor overrides "dim=64,depth=4"; values are Python literals
    backend: str = "auto"  # crate_kernels.set_backend: auto | triton | torch
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False


@dataclass(frozen=True)
class DataConfig:
    name: str = ""  # digits | lfw | pydoc, or a path: image folder tree, CIFAR python batches dir, text file
    val_fraction: float = 0.2  # held-out share for sets without an official split
    image_size: int = 0  # resize images to this side; 0 = the data's own size (224 for an image folder)
    crop_scale: float = 0.85  # random resized crop: smallest area share (1.0 = no crop)
    hflip: bool = False  # random horizontal flip (off for digits: a mirrored 2 is not a 2)
    randaugment: int = 0  # RandAugment ops per training image (0 = off)
    randaugment_magnitude: int = 9  # RandAugment strength, 0-30
    workers: int = 2  # image folders: DataLoader processes decoding images (0 = decode in the training process)
    prefetch: int = 2  # image folders: micro-batches each worker prepares ahead
    block_size: int = 0  # text window; 0 = the model's block_size


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw | lion
    lr: float = 5e-3
    min_lr: float = 3e-5  # cosine floor
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 40
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    batch_size: int = 64  # GLOBAL batch per optimizer step, whatever the world size
    grad_accum: int = 1  # micro-batches per step on each rank


@dataclass(frozen=True)
class TaskConfig:
    name: str = "classify"  # classify | mae | lm | mlm
    label_smoothing: float = 0.1
    mixup: float = 0.0  # Beta(a, a) mixup for classification; 0 = off
    cutmix: float = 0.0  # Beta(a, a) CutMix for classification; 0 = off (with mixup: one of the two per sample)
    mask_ratio: float = 0.75  # MAE
    mlm_probability: float = 0.15  # MLM: share of tokens to predict (80% [MASK], 10% random, 10% kept)
    sample_tokens: int = 200  # LM: characters generated at the end


@dataclass(frozen=True)
class TrainConfig:
    out: str = "runs/default"
    steps: int = 800  # the schedule's total length
    max_steps: int = 0  # stop after this step (0 = steps); the schedule still follows `steps`
    parallel: str = "none"  # none | ddp | fsdp2 (under torchrun)
    device: str = "auto"  # auto (cuda when present) | cpu | cuda
    cpu_threads: int = 1  # torch threads when training on CPU: small models run fastest on one; 0 = torch's default
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    ckpt_every: int = 200
    keep_last: int = 2  # checkpoints kept
    export: bool = True  # write model.safetensors at the end
    tensorboard: bool = True  # also log to TensorBoard when it is importable
    progress: bool = True  # tqdm bar on rank 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def resolved(self) -> TrainConfig:
        """Fill the task-dependent defaults ("" model or data) and check every choice; raises ValueError."""
        if self.task.name not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {self.task.name!r}")
        model_name, data_name = TASK_DEFAULTS[self.task.name]
        cfg = dataclasses.replace(
            self,
            model=dataclasses.replace(self.model, name=self.model.name or model_name),
            data=dataclasses.replace(self.data, name=self.data.name or data_name),
        )
        cfg.check()
        return cfg

    def check(self) -> None:
        choices = {
            "--parallel": (self.parallel, PARALLEL),
            "--device": (self.device, ("auto", "cpu", "cuda")),
            "--precision": (self.precision, ("auto", "fp32", "bf16", "fp16")),
            "--optim.name": (self.optim.name, ("adamw", "lion")),
            "--model.backend": (self.model.backend, ("auto", "triton", "torch")),
        }
        for flag, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{flag} must be one of {allowed}, got {value!r}")
        positive = {"--steps": self.steps, "--optim.batch_size": self.optim.batch_size}
        positive |= {"--optim.grad_accum": self.optim.grad_accum, "--log-every": self.log_every}
        positive |= {"--eval-every": self.eval_every, "--ckpt-every": self.ckpt_every, "--keep-last": self.keep_last}
        positive |= {"--data.prefetch": self.data.prefetch}
        for flag, value in positive.items():
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.max_steps < 0:
            raise ValueError(f"--max-steps must be >= 0 (0 = --steps), got {self.max_steps}")
        if not 0.0 < self.data.crop_scale <= 1.0:
            raise ValueError(f"--data.crop_scale must be in (0, 1], got {self.data.crop_scale}")
        counts = {"--data.workers": self.data.workers, "--data.randaugment": self.data.randaugment}
        counts |= {"--task.mixup": self.task.mixup, "--task.cutmix": self.task.cutmix}
        for flag, value in counts.items():
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        if not 0 <= self.data.randaugment_magnitude <= 30:
            raise ValueError(f"--data.randaugment_magnitude must be in [0, 30], got {self.data.randaugment_magnitude}")
        if not 0.0 < self.data.val_fraction < 1.0:
            raise ValueError(f"--data.val_fraction must be in (0, 1), got {self.data.val_fraction}")
        if not 0.0 < self.task.mask_ratio < 1.0:  # the MAE loss averages over the masked patches: some must be
            raise ValueError(f"--task.mask_ratio must be in (0, 1), got {self.task.mask_ratio}")
        if not 0.0 < self.task.mlm_probability < 1.0:
            raise ValueError(f"--task.mlm_probability must be in (0, 1), got {self.task.mlm_probability}")
        if self.optim.lr <= 0 or self.optim.min_lr < 0 or self.optim.warmup_steps < 0 or self.optim.grad_clip < 0:
            raise ValueError("--optim.lr must be > 0 and --optim.min_lr, --optim.warmup_steps, --optim.grad_clip >= 0")
        parse_model_args(self.model.args)

    @property
    def last_step(self) -> int:
        return min(self.max_steps or self.steps, self.steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_model_args(text: str) -> dict[str, Any]:
    """``"dim=64,image_size=(8, 8),pool=mean"`` -> ``{"dim": 64, "image_size": (8, 8), "pool": "mean"}``.

    Values are Python literals; a bare word is a string. The model registry then checks each value's type.
    """
    if not text.strip():
        return {}
    expected = f"--model.args: expected name=value pairs separated by commas (Python literals), got {text!r}"
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        raise ValueError(expected) from None
    if not isinstance(call, ast.Call) or call.args or any(kw.arg is None for kw in call.keywords):
        raise ValueError(expected)
    overrides: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg in overrides:
            raise ValueError(f"--model.args: {kw.arg} given twice in {text!r}")
        try:
            overrides[kw.arg] = kw.value.id if isinstance(kw.value, ast.Name) else ast.literal_eval(kw.value)
        except ValueError:
            raise ValueError(
                f"--model.args: {kw.arg}= must be a Python literal, got {ast.unparse(kw.value)!r}"
            ) from None
    return overrides


# ---- dataclass <-> flat dotted keys, with type checks ----


def _fields(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf name -> its resolved annotation, for a config dataclass."""
    hints = typing.get_type_hints(cls)
    leaves: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            leaves |= _fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            leaves[prefix + f.name] = hints[f.name]
    return leaves


LEAVES = _fields(TrainConfig)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check (and for strings from the command line, parse) ``value`` as ``annotation``; TypeError names the key."""
    if typing.get_origin(annotation) is tuple:
        items = value.split(",") if isinstance(value, str) else value
        args = typing.get_args(annotation)
        if not isinstance(items, (list, tuple)) or len(items) != len(args):
            raise TypeError(f"{key}: expected {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(items, args, strict=True))
    if isinstance(value, str) and annotation is not str:
        if annotation is bool:
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise TypeError(f"{key}: expected true/false, got {value!r}")
            return lowered in ("true", "1", "yes")
        try:
            return annotation(value)
        except ValueError:
            raise TypeError(f"{key}: expected {annotation.__name__}, got {value!r}") from None
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not annotation:
        raise TypeError(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def from_flat(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A config from ``base`` (default: defaults) with dotted ``values`` applied; unknown keys raise ValueError."""
    tree = (base or TrainConfig()).to_dict()
    for key, value in values.items():
        if key not in LEAVES:
            raise ValueError(f"unknown config key {key!r}; known keys: {', '.join(sorted(LEAVES))}")
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node[section]
        node[leaf] = _coerce(key, value, LEAVES[key])
    hints = typing.get_type_hints(TrainConfig)
    sections = {name: hints[name](**tree.pop(name)) for name in list(tree) if isinstance(tree[name], dict)}
    return TrainConfig(**tree, **sections)


def load_file(path: str | Path) -> dict[str, Any]:
    """Dotted values from a TOML (``[optim]`` tables) or JSON (nested objects) file, e.g. a saved config.json."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: no such file {str(path)!r}")
    if path.suffix == ".toml":
        import tomllib  # Python >= 3.11

        return flatten(tomllib.loads(path.read_text()))
    if path.suffix == ".json":
        return flatten(json.loads(path.read_text()))
    raise ValueError(f"--config: expected a .toml or .json file, got {str(path)!r}")


ALIASES = {"model": "model.name", "model-args": "model.args", "data": "data.name", "task": "task.name"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crate-train",
        description="Train a CRATE model. No flags: a small CRATE classifier on scikit-learn digits (CPU, minutes).",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,  # only the flags given reach the namespace
    )
    parser.add_argument("--config", help="a TOML or JSON file of config values (flags override it)")
    defaults = flatten(TrainConfig().to_dict())
    for key, annotation in LEAVES.items():
        names = {f"--{key}", f"--{key.replace('_', '-')}"}
        names |= {f"--{alias}" for alias, target in ALIASES.items() if target == key}
        kind = "x".join(a.__name__ for a in typing.get_args(annotation)) or annotation.__name__
        parser.add_argument(*sorted(names), dest=key, metavar=kind.upper(), help=f"default: {defaults[key]!r}")
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The resolved config from a command line; bad values raise ConfigError before anything is built."""
    namespace = vars(build_parser().parse_args(argv))
    config_file = namespace.pop("config", None)
    try:
        base = from_flat(load_file(config_file)) if config_file else None
        return from_flat(namespace, base).resolved()
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err
