"""Do a classifier's attention maps segment objects? CRATE against the same-size ViT, one recipe, one data set.

Trains each model at each seed supervised on ``shapes`` with the same flags (``crate-train``; an existing run folder
resumes or is left as it is), runs ``crate-segment`` on the held-out split (unless ``--out`` already holds that run's
``segmentation.json``), and writes ``table.md`` and ``results.json`` (accuracy, mIoU and CorLoc of the attention and
MaskCut masks per run) plus each run's overlays into the output folder.

Usage: PYTHONPATH=. python -m benchmarks.segmentation [--models crate_demo,vit_demo] [--steps 600] [--seeds 0,1]
[--runs runs/segmentation] [--out benchmarks/results/segmentation-<date>]
"""

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

from crate_kernels import files
from crate_kernels.train.segment_cli import METHODS
from crate_kernels.train.segment_cli import main as crate_segment

# One recipe for every model: patch 8 on the 64-pixel images (64 patches), AdamW at 1e-3, flips and crops.
RECIPE = "--model-args patch_size=8 --data shapes --data.hflip true --optim.lr 1e-3 --eval-every 250 --ckpt-every 250"


def main() -> None:
    today = datetime.date.today().isoformat()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="crate_demo,vit_demo")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--runs", default="runs/segmentation", help="where the training runs go")
    parser.add_argument("--out", default=f"benchmarks/results/segmentation-{today}")
    args = parser.parse_args()
    out, rows = Path(args.out), []
    for name in args.models.split(","):
        for seed in args.seeds.split(","):
            rows.append(_train_and_segment(name, int(seed), args.steps, Path(args.runs), out))
    lines = ["| model | seed | steps | accuracy | " + " | ".join(f"{m} mIoU | {m} CorLoc" for m in METHODS) + " |"]
    lines.append("|---" * (4 + 2 * len(METHODS)) + "|")
    for r in rows:
        scores = " | ".join(f"{r[m]['miou']:.3f} | {r[m]['corloc']:.3f}" for m in METHODS)
        lines.append(f"| {r['model']} | {r['seed']} | {args.steps} | {r['accuracy']:.3f} | {scores} |")
    files.write_text(out / "results.json", json.dumps(rows, indent=2) + "\n")
    files.write_text(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def _train_and_segment(name: str, seed: int, steps: int, runs: Path, out: Path) -> dict:
    run, scored = runs / f"{name}-seed{seed}", out / f"{name}-seed{seed}"
    flags = [*RECIPE.split(), "--model", name, "--steps", str(steps), "--seed", str(seed)]
    command = [sys.executable, "-m", "crate_kernels.train", *flags, "--out", str(run), "--progress", "false"]
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
    segment_args = ["--checkpoint", str(run), "--out", str(scored), "--progress", "0"]
    if not (scored / "segmentation.json").is_file() and crate_segment(segment_args) != 0:
        raise SystemExit(f"crate-segment failed on {run}")
    report = json.loads((scored / "segmentation.json").read_text())
    return report | {"seed": seed, "command": " ".join(command[1:])}


if __name__ == "__main__":
    main()
