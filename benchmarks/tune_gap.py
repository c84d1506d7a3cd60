"""What the heuristic configs leave on the table: each kernel of one training step, timed with its heuristic config
and with the config the autotuner picks, in the same process (a GPU run of benchmarks/gpu_check.sh).

    python -m benchmarks.tune_gap --model crate_base_patch16_224 --dtype bf16 --batch 64 --out DIR [--deadline T]

The step's launches are recorded on the GPU inside ``backend.dry_run()`` (the launchers' own choices, as
benchmarks/compile_report.py does on CPU); each distinct autotune key is then tuned (``set_autotune(True)``, the
decorator's pruned search) and both configs are timed with ``triton.testing.do_bench``. Writes ``tune_gap.md`` and
``tune_gap.json``; kernels not reached before ``--deadline`` (Unix time) are listed as not measured.
"""

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import triton


def _time(launch, config: triton.Config) -> float:
    from crate_kernels.kernels.configs import COMPILE_OPTIONS

    fn = launch.kernel.fn
    options = launch.constexprs | COMPILE_OPTIONS | config.all_kwargs()
    return triton.testing.do_bench(lambda: fn[launch.grid](*launch.args, **options), warmup=10, rep=50)


def _tuned(launch) -> triton.Config:
    """The config the autotuner picks for this launch (tuning it now unless cached)."""
    from crate_kernels.kernels import configs

    configs.set_autotune(True)
    try:
        launch.kernel[launch.grid](*launch.args, **launch.constexprs, **configs.COMPILE_OPTIONS)
    finally:
        configs.set_autotune(False)
    return launch.kernel.best_config


def measure(preset: str, dtype: str, batch: int, deadline: float) -> Iterator[dict]:
    """One row per distinct autotune key of the step, as it is measured."""
    from benchmarks.compile_report import DTYPES, _config_json, _name, _step_inputs
    from crate_kernels import backend, create_model

    model = create_model(preset).cuda()
    inputs = _step_inputs(model, batch).cuda()
    with backend.dry_run() as launches:
        with torch.autocast("cuda", dtype=DTYPES[dtype], enabled=dtype != "fp32"):
            out = model(inputs)
        out.float().sum().backward()
    seen = set()
    for launch in launches:
        if not isinstance(launch.kernel, triton.runtime.Autotuner):
            continue
        named = dict(zip(launch.kernel.fn.arg_names, launch.args, strict=False)) | launch.constexprs
        key = (_name(launch.kernel), *(str(named[k]) for k in launch.kernel.keys))
        key += tuple(str(a.dtype) for a in launch.args if isinstance(a, torch.Tensor))
        if key in seen:
            continue
        seen.add(key)
        row = {"kernel": key[0], "key": list(key[1:]), "heuristic": _config_json(launch.config)}
        if time.time() > deadline:
            yield row | {"not_measured": "the run's deadline"}
            continue
        tuned = _tuned(launch)
        heuristic_ms, tuned_ms = _time(launch, launch.config), _time(launch, tuned)
        yield row | {"tuned": _config_json(tuned), "heuristic_ms": heuristic_ms, "tuned_ms": tuned_ms}


def _markdown(preset: str, dtype: str, rows: list[dict]) -> str:
    lines = [
        f"# Heuristic vs autotuned configs: {preset}, {dtype}, {torch.cuda.get_device_name()}",
        "",
        "| kernel | autotune key | heuristic | ms | tuned | ms | heuristic / tuned |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for r in rows:
        h = " ".join(f"{k}={v}" for k, v in r["heuristic"].items())
        if "not_measured" in r:
            lines.append(f"| {r['kernel']} | {', '.join(r['key'])} | {h} | not measured | | | |")
            continue
        t = " ".join(f"{k}={v}" for k, v in r["tuned"].items())
        ratio = r["heuristic_ms"] / r["tuned_ms"]
        lines.append(
            f"| {r['kernel']} | {', '.join(r['key'])} | {h} | {r['heuristic_ms']:.3f} | {t} | {r['tuned_ms']:.3f} "
            f"| {ratio:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from crate_kernels.files import write_text

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="crate_base_patch16_224")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--deadline", type=float, default=float("inf"), help="Unix time to stop tuning new kernels")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_gap: needs a CUDA device", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for row in measure(args.model, args.dtype, args.batch, args.deadline):  # written after each row: a stage cut
        rows.append(row)  # off at its time limit keeps what it measured
        write_text(args.out / "tune_gap.json", json.dumps({"model": args.model, "dtype": args.dtype, "rows": rows}))
        write_text(args.out / "tune_gap.md", _markdown(args.model, args.dtype, rows))
    print(_markdown(args.model, args.dtype, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
