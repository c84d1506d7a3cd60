"""What a training step of a preset compiles, and what each compiled kernel uses, measured on CPU (no GPU).

    python -m benchmarks.compile_report --model crate_base_patch16_224 --dtype bf16 --target sm_90 --out DIR
    python -m benchmarks.compile_report --model crate_lm_small --dtype bf16 --target sm_90 --autotune --out DIR

One training step (forward under autocast to ``--dtype``, then backward) runs on CPU inside ``backend.dry_run()``:
the launchers choose their kernels, constexprs and heuristic configs exactly as on a GPU and record them instead of
launching. Each distinct specialisation is then compiled for ``--target`` with Triton's own ptxas on a cold cache
(``benchmarks/compiled.py``); with ``--autotune``, every config the autotuner would try for it (its pruned search).
Writes ``compile_report.md`` and ``compile_report.json`` = ``{"kernels": [{"kernel", "pointers", "constexprs",
"config", "compile_s", "registers", "spill_bytes", "stack_bytes", "shared_bytes", "occupancy", "tensor_core_ops"}],
"total_compile_s", ...}`` (``_autotune`` in the names with ``--autotune``; ``occupancy``: resident blocks per SM).
``total_compile_s``: the cold-start compile seconds of the step (Triton compiles on the launching thread, one kernel
after another). docs/design.md, 'Kernel configurations'.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import triton

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _step_inputs(model: torch.nn.Module, batch: int) -> torch.Tensor:
    config = model.config
    if "vocab_size" in config:
        return torch.randint(config["vocab_size"], (batch, config["block_size"]))
    size = config["image_size"]
    return torch.randn(batch, config.get("channels", 3), size, size)


def record_step(preset: str, dtype: torch.dtype, batch: int, target: str = "sm_90") -> list:
    """The launches (``crate_kernels.ops.launch.Launch``) of one training step of ``preset`` on a GPU of ``target``,
    recorded on CPU."""
    from crate_kernels import backend, create_model

    torch.manual_seed(0)
    model = create_model(preset)
    inputs = _step_inputs(model, batch)
    from benchmarks.compiled import arch

    capability = divmod(arch(target), 10)
    with backend.dry_run(capability) as launches:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(inputs)
        out.float().sum().backward()
    return launches


def _key(launch) -> tuple:
    from benchmarks.compiled import specialisation

    types, constexprs, divisible = specialisation(launch)
    return launch.kernel, tuple(sorted(types.items())), tuple(sorted(map(str, constexprs.items()))), divisible


def search_configs(launch) -> list[triton.Config]:
    """The configs the autotuner would try at this launch (its pruned list); the heuristic one for other kernels."""
    kernel = launch.kernel
    if not isinstance(kernel, triton.runtime.Autotuner):
        return [launch.config]
    named_args = dict(zip(kernel.fn.arg_names, launch.args, strict=False))
    prune = kernel.early_config_prune
    return prune(kernel.configs, named_args, **launch.constexprs) if prune else list(kernel.configs)


def _config_json(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _name(kernel) -> str:
    return (kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel).__name__


def report(preset: str, dtype: str, target: str, autotune: bool, batch: int) -> dict:
    from benchmarks.compiled import profile_launch, specialisation

    torch.set_float32_matmul_precision("highest")  # PyTorch's default: IEEE fp32 dots
    launches = record_step(preset, DTYPES[dtype], batch, target)
    unique = {}
    for launch in launches:
        unique.setdefault(_key(launch), launch)
    rows = []
    for launch in unique.values():
        types, constexprs, _ = specialisation(launch)
        row = {"kernel": _name(launch.kernel), "constexprs": {k: str(v) for k, v in constexprs.items()}}
        row["pointers"] = {k: v for k, v in types.items() if v.startswith("*")}
        for config in search_configs(launch) if autotune else [launch.config]:
            profile = profile_launch(launch, config, target, cold=True)
            rows.append(row | {"config": _config_json(config)} | profile._asdict())
    return {
        "model": preset,
        "dtype": dtype,
        "target": target,
        "autotune": autotune,
        "batch": batch,
        "launches": len(launches),
        "kernels": rows,
        "total_compile_s": round(sum(r["compile_s"] for r in rows), 2),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }


def _markdown(data: dict) -> str:
    lines = [
        f"# Compile report: {data['model']}, {data['dtype']}, {data['target']}"
        f"{', autotune search' if data['autotune'] else ', heuristic configs'}",
        "",
        f"One training step (batch {data['batch']}) launches {data['launches']} kernels; "
        f"{len(data['kernels'])} distinct compiles take **{data['total_compile_s']:.1f} s** cold "
        f"(Triton {data['triton']}, torch {data['torch']}, {data['machine']}, {data['date']}; CPU only).",
        "",
        "| kernel | pointers | constexprs | config | compile s | registers | spill B | stack B | shared B | blocks/SM "
        "| dots |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    skip = {"UPCAST"}
    for r in data["kernels"]:
        constexprs = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k not in skip and "stride" not in k)
        config = " ".join(f"{k}={v}" for k, v in r["config"].items())
        usage = " | ".join(str(r[k]) for k in ("registers", "spill_bytes", "stack_bytes", "shared_bytes", "occupancy"))
        pointers = " ".join(v.lstrip("*") for v in r["pointers"].values())
        lines.append(
            f"| {r['kernel']} | {pointers} | {constexprs} | {config} | {r['compile_s']:.2f} | {usage} "
            f"| {r['tensor_core_ops']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.compiled import TARGETS
    from crate_kernels.files import write_text
    from crate_kernels.models.registry import MODELS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(MODELS), metavar="PRESET")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--target", default="sm_90", choices=sorted(TARGETS))
    parser.add_argument("--autotune", action="store_true", help="compile every config the autotuner would try")
    parser.add_argument("--batch", type=int, default=2, help="batch of the recorded step (the GEMMs' token count)")
    parser.add_argument("--out", type=Path, required=True, help="folder for compile_report.{md,json}")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_report: unset TRITON_INTERPRET (the interpreter never compiles)", file=sys.stderr)
        return 2
    data = report(args.model, args.dtype, args.target, args.autotune, args.batch)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_autotune" if args.autotune else ""
    write_text(args.out / f"compile_report{suffix}.json", json.dumps(data, indent=1) + "\n")
    write_text(args.out / f"compile_report{suffix}.md", _markdown(data))
    print(_markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
