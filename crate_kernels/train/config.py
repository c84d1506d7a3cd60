"""Training configuration: frozen dataclasses, a command line generated from them, TOML/JSON files.

Every leaf field is a flag ``--section.field`` (``--optim.lr 1e-3``); top-level fields are ``--field``. Dashes and
underscores are interchangeable (``--max-steps`` = ``--max_steps``). Short aliases: ``--model`` (``--model.name``),
``--model-args`` (``--model.args``), ``--data`` (``--data.name``), ``--task`` (``--task.name``). Precedence:
defaults < ``--config FILE`` < flags. Every value is type-checked against the field's annotation, so a typo or a
wrong type fails before anything is built. A field's trailing comment is its documentation: ``--help`` shows it,
with the allowed values of each choice (``CHOICES``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import io
import json
import sys
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crate_kernels.models.registry import parse_model_args

TASKS = ("classify", "mae", "lm", "mlm", "dino")
PARALLEL = ("none", "ddp", "fsdp2")
# Without --model / --data: each task's model, data, and model arguments under --model-args (docs/design.md, "Training")
TASK_DEFAULTS = {
    "classify": ("crate_demo", "digits", "patch_size=4"),
    "mae": ("crate_mae_demo", "digits", ""),
    "lm": ("crate_lm_demo", "pydoc", ""),
    "mlm": ("crate_mlm_demo", "pydoc", ""),
    "dino": ("crate_demo", "digits", ""),
}


class ConfigError(ValueError):
    """A run that cannot start (bad flag, unknown model, missing data, batch that does not divide)."""


def did_you_mean(word: str, known: typing.Iterable[str] | dict[str, str]) -> str:
    """``"; did you mean X?"`` naming the entries of ``known`` closest to ``word``, or ``""``. A dict maps what is
    compared to what is named."""
    names = known if isinstance(known, dict) else {name: name for name in known}
    close = difflib.get_close_matches(word, list(names), n=3)
    return f"; did you mean {' or '.join(names[c] for c in close)}?" if close else ""


@dataclass(frozen=True)
class ModelConfig:
    name: str = ""  # a registry name (crate_kernels.list_models()); "" = the task's demo model
    args: str = ""  # constructor overrides "dim=64,depth=4" (Python literals); no --model: over patch_size=4 (classify)
    backend: str = "auto"  # crate_kernels.set_backend: auto = Triton kernels where they run, else PyTorch
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # recompute each block's activations in backward: less memory, more compute


@dataclass(frozen=True)
class DataConfig:
    name: str = ""  # digits | lfw | shapes | pydoc, or a path: image folder tree, CIFAR python batches dir, text file
    val_fraction: float = 0.2  # held-out share for sets without an official split
    image_size: int = 0  # resize images to this side; 0 = the data's own size (224 for an image folder)
    crop_scale: float = 1.0  # random resized crop: smallest area share (1.0 = no crop)
    translate: float = 0.0625  # random shift, uniform up to this share of each side (half a pixel of 8×8); 0 = off
    hflip: bool = False  # random horizontal flip (off for digits: a mirrored 2 is not a 2)
    randaugment: int = 0  # RandAugment ops per training image (0 = off)
    randaugment_magnitude: int = 9  # RandAugment strength, 0-30
    workers: int = 2  # image folders: DataLoader processes decoding images (0 = decode in the training process)
    block_size: int = 0  # text window; 0 = the model's block_size


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # the optimizer
    lr: float = 5e-3  # peak learning rate (Lion wants 3-10x less than AdamW)
    min_lr: float = 3e-5  # cosine floor
    weight_decay: float = 0.05  # decoupled, on matrices only (not norms, biases, embeddings)
    betas: tuple[float, float] = (0.9, 0.999)  # moment decay rates "b1,b2"
    warmup_steps: int = 40  # linear warm-up from 0 to lr, then the cosine
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    batch_size: int = 64  # GLOBAL batch per optimizer step, whatever the world size
    grad_accum: int = 1  # micro-batches per step on each rank


@dataclass(frozen=True)
class TaskConfig:
    name: str = "classify"  # the objective: image classes, masked image completion, character LM, masked LM or
    # self-distillation (DINO)
    label_smoothing: float = 0.1  # classification targets: 1 - s on the class, s spread over all
    mixup: float = 0.0  # Beta(a, a) mixup for classification; 0 = off
    cutmix: float = 0.0  # Beta(a, a) CutMix for classification; 0 = off (with mixup: one of the two per sample)
    mask_ratio: float = 0.75  # MAE: share of patches hidden from the encoder
    mlm_probability: float = 0.15  # MLM: share of tokens to predict (80% [MASK], 10% random, 10% kept)
    sample_tokens: int = 200  # LM: characters generated at the end
    compare: str = ""  # classify: first train this registry model (vit_demo, ...) with the same recipe, as a baseline
    dino_head: tuple[int, int, int] = (512, 64, 256)  # DINO head: MLP width, bottleneck, prototypes K "w,b,K"
    # (upstream 2048,256,65536)
    dino_head_bn: bool = True  # DINO: BatchNorm in the head's MLP (upstream's use_bn_in_head): small images give
    # near-identical features at init and the head collapses without it; its statistics are the micro-step's on all
    # ranks together (global across ranks; another grad_accum changes them)
    dino_local_crops: int = 4  # DINO: local views per image, beside the 2 global ones (upstream 8 to 10)
    dino_global_scale: tuple[float, float] = (0.4, 1.0)  # DINO: area share of a global view "lo,hi"
    dino_local_scale: tuple[float, float] = (0.05, 0.4)  # DINO: area share of a local view "lo,hi"
    dino_local_size: int = 0  # DINO: side of the local views in pixels, a multiple of the patch size (0: each side
    # 3/7 of the model's, as upstream's 96 of 224, in whole patches, at least 2, at most all)
    dino_teacher_temp: tuple[float, float] = (0.04, 0.07)  # DINO: teacher softmax temperature, warmup "from,to"
    dino_teacher_temp_epochs: int = 10  # DINO: epochs of the teacher temperature's linear warmup
    dino_momentum: float = 0.996  # DINO: the teacher's EMA momentum at step 0, then a cosine to 1
    dino_weight_decay_end: float = 0.4  # DINO: weight decay at the last step (a cosine from --optim.weight_decay)
    dino_freeze_last_layer: int = 1  # DINO: epochs during which the head's last layer is not updated


@dataclass(frozen=True)
class TrainConfig:
    out: str = "runs/default"  # the run folder: config, metrics, checkpoints, plots; an existing run resumes
    steps: int = 800  # the schedule's total length
    max_steps: int = 0  # stop after this step (0 = steps); the schedule still follows `steps`
    parallel: str = "none"  # one process, or under torchrun: DDP (replicas) or FSDP2 (sharded, ZeRO-3)
    device: str = "auto"  # auto = cuda when present
    cpu_threads: int = 0  # torch threads on CPU; 0 = one per core (on a busy machine 1 is faster: README)
    precision: str = "auto"  # autocast dtype; auto = bf16 on CUDA, fp32 on CPU
    seed: int = 0  # initial weights, data order, augmentations, dropout
    log_every: int = 10  # steps between metrics records
    eval_every: int = 200  # steps between held-out evaluations
    ckpt_every: int = 200  # steps between checkpoints (Ctrl-C or SIGTERM also saves one)
    keep_last: int = 2  # checkpoints kept
    export: bool = True  # write model.safetensors at the end
    tensorboard: bool = True  # also log to TensorBoard when it is importable
    progress: bool = True  # tqdm bar on rank 0
    allow_config_change: bool = False  # resume a run with a changed config (recorded in config_history.jsonl)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def resolved(self) -> TrainConfig:
        """Fill the task-dependent defaults ("" model or data) and check every choice; raises ValueError."""
        _check_choice("task.name", self.task.name)
        model_name, data_name, model_args = TASK_DEFAULTS[self.task.name]
        model, data = self.model, dataclasses.replace(self.data, name=self.data.name or data_name)
        if not model.name:  # the demo model with its training arguments, under the user's
            args = parse_model_args(model_args) | parse_model_args(model.args)
            model = dataclasses.replace(model, name=model_name, args=",".join(f"{k}={v!r}" for k, v in args.items()))
        cfg = dataclasses.replace(self, model=model, data=data)
        cfg.check()
        return cfg

    def check(self) -> None:
        values = flatten(self.to_dict())
        for key in CHOICES:
            _check_choice(key, values[key])
        positive = {"--steps": self.steps, "--optim.batch_size": self.optim.batch_size, "--log-every": self.log_every}
        positive |= {"--optim.grad_accum": self.optim.grad_accum, "--eval-every": self.eval_every}
        for flag, value in (positive | {"--ckpt-every": self.ckpt_every, "--keep-last": self.keep_last}).items():
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        d = self.data
        if not (0.0 < d.crop_scale <= 1.0 and 0.0 <= d.translate < 0.5):
            raise ValueError(
                f"--data.crop_scale {d.crop_scale} must be in (0, 1], --data.translate {d.translate} in [0, 0.5)"
            )
        counts = {"--max-steps": self.max_steps, "--data.workers": d.workers, "--data.randaugment": d.randaugment}
        for flag, value in (counts | {"--task.cutmix": self.task.cutmix, "--task.mixup": self.task.mixup}).items():
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        if not 0 <= d.randaugment_magnitude <= 30:
            raise ValueError(f"--data.randaugment_magnitude must be in [0, 30], got {d.randaugment_magnitude}")
        shares = {"--data.val_fraction": d.val_fraction, "--task.mask_ratio": self.task.mask_ratio}
        for flag, value in (shares | {"--task.mlm_probability": self.task.mlm_probability}).items():
            if not 0.0 < value < 1.0:
                raise ValueError(f"{flag} must be in (0, 1), got {value}")
        if self.optim.lr <= 0 or self.optim.min_lr < 0 or self.optim.warmup_steps < 0 or self.optim.grad_clip < 0:
            raise ValueError("--optim.lr must be > 0 and --optim.min_lr, --optim.warmup_steps, --optim.grad_clip >= 0")
        parse_model_args(self.model.args)

    @property
    def last_step(self) -> int:
        return min(self.max_steps or self.steps, self.steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The allowed values of each choice field: ``check`` enforces them, ``--help`` lists them.
CHOICES = {
    "parallel": PARALLEL,
    "device": ("auto", "cpu", "cuda"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "model.backend": ("auto", "triton", "torch"),
    "optim.name": ("adamw", "lion"),
    "task.name": TASKS,
}


def _check_choice(key: str, value: str) -> None:
    allowed = CHOICES[key]
    if value not in allowed:
        raise ValueError(
            f"{flag(key)} must be one of {', '.join(allowed)}; got {value!r}{did_you_mean(value, allowed)}"
        )


# ---- dataclass <-> flat dotted keys, with type checks ----


def _sections(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, type]]:
    """A config dataclass and, depth first, each nested one, with the dotted prefix of its fields."""
    yield prefix, cls
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            yield from _sections(hint, f"{prefix}{name}.")


# Dotted leaf name -> its resolved annotation.
LEAVES = {
    prefix + name: hint
    for prefix, section in _sections(TrainConfig)
    for name, hint in typing.get_type_hints(section).items()
    if not dataclasses.is_dataclass(hint)
}


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
    """Nested config values -> dotted keys: ``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``."""
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
    if path.suffix not in (".toml", ".json"):
        raise ValueError(f"--config: expected a .toml or .json file, got {str(path)!r}")
    text = path.read_text(errors="replace")
    try:
        if path.suffix == ".toml":
            import tomllib  # Python >= 3.11

            tree = tomllib.loads(text)
        else:
            tree = json.loads(text)
    except ValueError as err:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise ValueError(f"--config {str(path)!r}: not valid {path.suffix[1:].upper()} ({err})") from None
    if not isinstance(tree, dict):
        raise ValueError(
            f"--config {str(path)!r}: the top level must be an object of config values "
            f'(e.g. {{"steps": 100, "optim": {{"lr": 0.001}}}}), got a {type(tree).__name__}'
        )
    return flatten(tree)


ALIASES = {"model": "model.name", "model-args": "model.args", "data": "data.name", "task": "task.name"}


def flag(key: str) -> str:
    """The flag a message names for the dotted config ``key``: its alias when it has one."""
    return "--" + next((alias for alias, target in ALIASES.items() if target == key), key)


def _field_docs(cls: type) -> dict[str, str]:
    """Field name -> its documentation: the field's trailing comment in ``cls``'s source, continued on comment-only
    lines right below it."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (a frozen application): help without descriptions
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    first_name: dict[int, str] = {}  # line -> the name it starts with
    last: tuple[str, int] | None = None  # the documented field, and its comment's last line
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        line, column = token.start
        at_start = not token.line[:column].strip()
        if token.type == tokenize.NAME and at_start:
            first_name[line] = token.string
        elif token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            if first_name.get(line) in names:
                last = (first_name[line], line)
                docs[last[0]] = text
            elif last and at_start and line == last[1] + 1:
                docs[last[0]] += " " + text
                last = (last[0], line)
    return docs


# Dotted leaf name -> what ``--help`` says of it.
FIELD_DOCS = {
    prefix + name: doc for prefix, section in _sections(TrainConfig) for name, doc in _field_docs(section).items()
}


class _Parser(argparse.ArgumentParser):
    """argparse with underscores in flag names read as dashes, and a did-you-mean for a mistyped flag."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        args = [_dashed(arg) if arg.startswith("--") else arg for arg in args]
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> typing.NoReturn:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            known = [name for action in self._actions for name in action.option_strings]
            unknown = [arg.split("=")[0] for arg in message[len(prefix) :].split() if arg.startswith("-")]
            message = "; ".join(f"unknown flag {arg}{_flag_hint(arg, known)}" for arg in unknown) or message
        super().error(message)


def _dashed(arg: str) -> str:
    name, equals, value = arg.partition("=")
    return name.replace("_", "-") + equals + value


def _flag_hint(arg: str, known: list[str]) -> str:
    """The flags ``arg`` may have meant: within its section when it names one (compared by field name), else
    among all; the section's flags when none is close."""
    section, _, field = arg.removeprefix("--").rpartition(".")
    prefix = f"--{section}."
    inside = {name.removeprefix(prefix): name for name in known if section and name.startswith(prefix)}
    if not inside:
        return did_you_mean(arg, known) or "; see crate-train --help"
    return did_you_mean(field, inside) or f"; --{section}.* flags: {', '.join(sorted(inside.values()))}"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="crate-train",
        usage="crate-train [--config FILE] [--FLAG VALUE ...]",
        description="Train a CRATE model. No flags: a small CRATE classifier on scikit-learn digits (CPU, minutes). "
        "Every flag below is a config field; dashes and underscores are interchangeable.",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,  # only the flags given reach the namespace
    )
    parser.add_argument("--config", metavar="FILE", help="a TOML or JSON file of config values (flags override it)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its line")
    defaults = flatten(TrainConfig().to_dict())
    groups = {"": parser.add_argument_group("run")}
    for key, annotation in LEAVES.items():
        section = key.rpartition(".")[0]
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} (--{section}.*)")
        names = {f"--{key.replace('_', '-')}"} | {f"--{alias}" for alias, target in ALIASES.items() if target == key}
        kind = ",".join(a.__name__ for a in typing.get_args(annotation)) or annotation.__name__
        metavar = "{" + ",".join(CHOICES[key]) + "}" if key in CHOICES else kind.upper()
        help_text = FIELD_DOCS.get(key, "")
        if key == "model.name":
            import crate_kernels

            help_text += f"; one of: {', '.join(crate_kernels.list_models())}"
        default = defaults[key]
        help_text += f" (default: {','.join(map(str, default)) if isinstance(default, tuple) else repr(default)})"
        groups[section].add_argument(*sorted(names), dest=key, metavar=metavar, help=help_text.replace("%", "%%"))
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The resolved config from a command line; bad values raise ConfigError before anything is built."""
    namespace = vars(build_parser().parse_args(argv))
    config_file = namespace.pop("config", None)
    namespace.pop("debug", None)  # read by crate-train itself
    try:
        base = from_flat(load_file(config_file)) if config_file else None
        return from_flat(namespace, base).resolved()
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err
