"""A run folder's record of its own config, and whether a command may continue the run it holds.

- ``config.json``: the config the run started with; written when a run starts from step 0, never rewritten after.
- ``config_history.jsonl``: one record per resume that changed the config (``--allow-config-change``): the step it
  continued from, each change ``[old, new]``, and the whole new config.
A resume is compared with the latest of the two. Another model, shape, task, optimizer or checkpoint layout cannot
load the checkpoints at all and is refused whatever the flags; any other change is refused unless allowed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from crate_kernels import files
from crate_kernels.models.registry import parse_model_args
from crate_kernels.train.config import ConfigError, TrainConfig, flag, flatten

# Keys a resumed run may change and still be the same run (data.workers: how, not which, images are decoded).
NOT_RESUMED = {"out", "max_steps", "progress", "allow_config_change", "data.workers", "task.compare"}
# Keys whose change makes the checkpoints unloadable: the model and its shapes, the objective, the optimizer state.
INCOMPATIBLE = ("model.name", "model.args", "task.name", "optim.name")
CONFIG, HISTORY = "config.json", "config_history.jsonl"


def _latest(run_dir: Path) -> dict[str, Any] | None:
    """The flat config that trained the run's newest steps; None when ``config.json`` is missing or unreadable."""
    history = files.read_jsonl(run_dir / HISTORY)
    if history and isinstance(history[-1].get("config"), dict):
        return flatten(history[-1]["config"])
    try:
        saved = json.loads((run_dir / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return flatten(saved) if isinstance(saved, dict) else None


def _describe(key: str, old: Any, new: Any) -> str:
    if key == "model.args":  # the arguments that differ, not two long lists
        before, after = parse_model_args(old or ""), parse_model_args(new)
        keys = dict.fromkeys([*before, *after])
        return f"{flag(key)}: " + ", ".join(
            f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in keys if before.get(k) != after.get(k)
        )
    return f"{flag(key)} {old!r} -> {new!r}"


def changes(cfg: TrainConfig, run_dir: str | Path) -> dict[str, list[Any]] | None:
    """What ``cfg`` changes in the config that trained ``run_dir``'s checkpoints: ``{key: [old, new]}``.

    Raises ``ConfigError`` (before anything is written) for a change the checkpoints cannot follow, and for any
    other change unless ``cfg.allow_config_change``. None when there is no config to compare with (``config.json``
    missing or unreadable: written by an older version, or by hand): the run continues with ``cfg``.
    """
    run_dir = Path(run_dir)
    old = _latest(run_dir)
    if old is None:
        print(f"warning: {run_dir / CONFIG} is missing or unreadable: cannot check that this config matches the run")
        return None
    new, defaults = flatten(cfg.to_dict()), flatten(TrainConfig().to_dict())
    changed = {}
    for key, value in new.items():
        before = old.get(key, defaults[key])  # a field added since the run started: its default is what it ran with
        if key not in NOT_RESUMED and json.dumps(before) != json.dumps(value):
            changed[key] = [before, value]
    fatal = [key for key in INCOMPATIBLE if key in changed]
    if ("fsdp2" in (old.get("parallel"), cfg.parallel)) and "parallel" in changed:
        fatal.append("parallel")  # sharded (DCP) checkpoints against full state dicts
    if fatal:
        what = "; ".join(_describe(key, *changed[key]) for key in fatal)
        raise ConfigError(
            f"--out {str(run_dir)!r} holds a run its checkpoints cannot continue as this one ({what}): "
            "choose another --out, or resume it with its own config"
        )
    if changed and not cfg.allow_config_change:
        what = "; ".join(_describe(key, *change) for key, change in changed.items())
        raise ConfigError(
            f"--out {str(run_dir)!r} was trained with another config ({what}): resume it with the same config, "
            f"or pass --allow-config-change to continue with this one (recorded in {HISTORY})"
        )
    return changed


def record(cfg: TrainConfig, run_dir: str | Path, step: int, changed: dict[str, list[Any]] | None) -> None:
    """Write the run's config record (rank 0): a run from step 0 writes ``config.json`` anew (and drops an old
    history); a resume keeps it and appends the ``changed`` it accepted to ``config_history.jsonl``. ``changed``
    None: no readable record, so ``cfg`` becomes ``config.json``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if step == 0 or changed is None:
        files.write_text(run_dir / CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")
    if step == 0:
        (run_dir / HISTORY).unlink(missing_ok=True)
    elif changed:
        entry = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changed": changed}
        files.append_line(run_dir / HISTORY, json.dumps(entry | {"config": cfg.to_dict()}))
