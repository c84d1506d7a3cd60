"""timm-style model registry: ``create_model(name, **overrides)`` and ``list_models(pattern)``.

Each name maps to a class and its constructor arguments; an override replaces any of them. The registered names are
the model API contract shared by the training loop, the benchmarks and the checkpoint loaders.
"""

import difflib
import fnmatch
import inspect
from typing import Any

from torch import nn

_MODELS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {}


def register_model(name: str, cls: type[nn.Module], **config: Any) -> None:
    """Register ``name`` as ``cls(**config)``; a name is registered once."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = (cls, config)


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching the fnmatch ``pattern``, sorted."""
    return sorted(fnmatch.filter(_MODELS, pattern))


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The constructor arguments ``create_model(name, **overrides)`` passes to the model class."""
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "; see crate_kernels.list_models()"
        raise ValueError(f"unknown model name {name!r}{hint}")
    cls, config = _MODELS[name]
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
    model = _MODELS[name][0](**arguments)
    model.config = {"name": name, **arguments}
    return model
