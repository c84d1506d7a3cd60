"""timm-style model registry: ``create_model(name, **overrides)`` and ``list_models(pattern)``.

``MODELS`` below maps each name to a class and its constructor arguments; an override replaces any of them. The
registered names are the model API contract shared by the training loop, the benchmarks and the checkpoint loaders.
``parse_model_args`` reads overrides written on a command line (``crate-train --model-args``, ``crate-measure``).
"""

import ast
import difflib
import fnmatch
import inspect
from typing import Any

from torch import nn

from crate_kernels.models.crate import CRATE
from crate_kernels.models.crate_alpha import CRATEAlpha
from crate_kernels.models.crate_lm import CRATELM, CRATEMLM
from crate_kernels.models.crate_mae import CRATEMAE
from crate_kernels.models.vit import ViT


def _vit(dim: int, depth: int, heads: int, patch: int) -> dict[str, Any]:
    """A 224-pixel image model of width ``dim`` with ``dim_head = dim // heads``, as upstream's presets."""
    return {
        "image_size": 224,
        "patch_size": patch,
        "dim": dim,
        "depth": depth,
        "heads": heads,
        "dim_head": dim // heads,
    }


# Upstream's widths (dim, depth, heads), shared by vanilla CRATE and CRATE-α; small has P = 48.
_TINY, _SMALL, _BASE, _LARGE = (384, 12, 6), (576, 12, 12), (768, 12, 12), (1024, 24, 16)
_SIZES = {"tiny": _TINY, "small": _SMALL, "base": _BASE, "large": _LARGE}
_IMAGENET = {"num_classes": 1000}
# crate-lm's "crate" (base) is GPT-2-small sized, with nanoGPT's padded GPT-2 vocabulary; small is ours (crate-lm
# ships no smaller multi-layer size).
_LM_SMALL = {"vocab_size": 50304, "block_size": 1024, "dim": 384, "depth": 6, "heads": 6}
_LM_BASE = {"vocab_size": 50304, "block_size": 1024, "dim": 768, "depth": 12, "heads": 12}
# Demo sizes: scikit-learn digits (8×8, one channel, ten classes) and ASCII text; tests and the training defaults.
_DEMO_IMAGES = {"image_size": 8, "patch_size": 2, "channels": 1, "num_classes": 10}
_DEMO_IMAGES |= {"dim": 64, "depth": 4, "heads": 4, "dim_head": 16}
_DEMO_TEXT = {"vocab_size": 128, "block_size": 64, "dim": 64, "depth": 4, "heads": 4}

MODELS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "crate_tiny_patch16_224": (CRATE, _vit(*_TINY, 16) | _IMAGENET),
    "crate_tiny_patch8_224": (CRATE, _vit(*_TINY, 8) | _IMAGENET),
    "crate_small_patch16_224": (CRATE, _vit(*_SMALL, 16) | _IMAGENET),
    "crate_small_patch8_224": (CRATE, _vit(*_SMALL, 8) | _IMAGENET),
    "crate_base_patch16_224": (CRATE, _vit(*_BASE, 16) | _IMAGENET),
    "crate_base_patch8_224": (CRATE, _vit(*_BASE, 8) | _IMAGENET),
    "crate_large_patch16_224": (CRATE, _vit(*_LARGE, 16) | _IMAGENET),
    "crate_large_patch8_224": (CRATE, _vit(*_LARGE, 8) | _IMAGENET),
    # CRATE-α: B/16 and L/14 are its released checkpoints; S/16 from its width table.
    "crate_alpha_small_patch16_224": (CRATEAlpha, _vit(*_SMALL, 16) | _IMAGENET),
    "crate_alpha_base_patch16_224": (CRATEAlpha, _vit(*_BASE, 16) | _IMAGENET),
    "crate_alpha_large_patch14_224": (CRATEAlpha, _vit(*_LARGE, 14) | _IMAGENET),
    # CRATE-MAE: upstream's mae_crate_{tiny,small,base,large}; the decoder mirrors the encoder; no classifier.
    "crate_mae_tiny_patch16_224": (CRATEMAE, _vit(*_TINY, 16)),
    "crate_mae_small_patch16_224": (CRATEMAE, _vit(*_SMALL, 16)),
    "crate_mae_base_patch16_224": (CRATEMAE, _vit(*_BASE, 16)),
    "crate_mae_large_patch16_224": (CRATEMAE, _vit(*_LARGE, 16)),
    "crate_lm_small": (CRATELM, _LM_SMALL),
    "crate_lm_base": (CRATELM, _LM_BASE),
    "crate_mlm_small": (CRATEMLM, _LM_SMALL),
    "crate_mlm_base": (CRATEMLM, _LM_BASE),
    "crate_demo": (CRATE, _DEMO_IMAGES),
    "crate_alpha_demo": (CRATEAlpha, _DEMO_IMAGES),
    # The MAE objective does not use a classifier: its demo has none (num_classes=10 adds one for fine-tuning).
    "crate_mae_demo": (CRATEMAE, _DEMO_IMAGES | {"num_classes": 0}),
    "crate_lm_demo": (CRATELM, _DEMO_TEXT),
    "crate_mlm_demo": (CRATEMLM, _DEMO_TEXT),
    # The black-box baseline at each vanilla CRATE preset's width, depth and patch, and the demo's size.
    **{f"vit_{s}_patch{p}_224": (ViT, _vit(*w, p) | _IMAGENET) for s, w in _SIZES.items() for p in (16, 8)},
    "vit_demo": (ViT, _DEMO_IMAGES),
}


def register_model(name: str, cls: type[nn.Module], **config: Any) -> None:
    """Register ``name`` as ``cls(**config)`` beside ``MODELS``; a name is registered once."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    MODELS[name] = (cls, config)


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching the fnmatch ``pattern``, sorted."""
    return sorted(fnmatch.filter(MODELS, pattern))


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The constructor arguments ``create_model(name, **overrides)`` passes to the model class."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "; see crate_kernels.list_models()"
        raise ValueError(f"unknown model name {name!r}{hint}")
    cls, config = MODELS[name]
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise TypeError(f"{name} ({cls.__name__}) takes no argument(s) {unknown}; it accepts {accepted}")
    for key, value in overrides.items():
        _check_override(key, value, config.get(key, inspect.signature(cls).parameters[key].default))
    return {**config, **overrides}


def _check_override(key: str, value: Any, default: Any) -> None:
    """An override has the kind of the value it replaces: sizes are positive ints (or an (h, w) pair of them; an
    optional size, default None, is a positive int or None; ``num_classes`` may be 0 for no classifier), rates and
    steps non-negative numbers, switches and names their own type."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError(f"override {key} must be a bool, got {value!r}")
    elif default is None and value is None:
        return
    elif isinstance(default, int) or default is None:
        pair_of_ints = (
            isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) and v >= 1 for v in value)
        )
        least = 0 if key == "num_classes" else 1
        if not ((is_int and value >= least) or (key in ("image_size", "patch_size") and pair_of_ints)):
            kind = "a non-negative" if least == 0 else "a positive"
            raise ValueError(f"override {key} must be {kind} int, got {value!r}")
    elif isinstance(default, float):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
            raise ValueError(f"override {key} must be a non-negative number, got {value!r}")
    elif isinstance(default, str) and not isinstance(value, str):
        raise TypeError(f"override {key} must be a str, got {value!r}")


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model with random weights; ``overrides`` replace any constructor argument.

    The built model keeps ``model.config = {"name": name, **arguments}`` so it can be rebuilt.
    """
    arguments = model_config(name, **overrides)
    model = MODELS[name][0](**arguments)
    model.config = {"name": name, **arguments}
    return model


def parse_model_args(text: str) -> dict[str, Any]:
    """``"dim=64,image_size=(8, 8),pool=mean"`` -> ``{"dim": 64, "image_size": (8, 8), "pool": "mean"}``.

    Values are Python literals; a bare word is a string. ``model_config`` then checks each value's type.
    """
    if not text.strip():
        return {}
    expected = f"--model-args: expected name=value pairs separated by commas (Python literals), got {text!r}"
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        raise ValueError(expected) from None
    if not isinstance(call, ast.Call) or call.args or any(kw.arg is None for kw in call.keywords):
        raise ValueError(expected)
    overrides: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg in overrides:
            raise ValueError(f"--model-args: {kw.arg} given twice in {text!r}")
        try:
            overrides[kw.arg] = kw.value.id if isinstance(kw.value, ast.Name) else ast.literal_eval(kw.value)
        except ValueError:
            raise ValueError(
                f"--model-args: {kw.arg}= must be a Python literal, got {ast.unparse(kw.value)!r}"
            ) from None
    return overrides
