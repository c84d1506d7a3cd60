"""Do a model's attention maps segment objects? CRATE against the same-size ViT, one recipe, one data set.

Trains each model at each seed on ``shapes`` with the same flags (``crate-train``; an existing run folder resumes or
is left as it is): supervised, or self-supervised for a ``NAME:dino`` entry (``--task dino``, no labels; segmented
with the teacher's backbone). Then runs ``crate-segment`` on the held-out split (unless ``--out`` already holds that
run's ``segmentation.json``) and writes ``table.md`` and ``results.json`` (accuracy, or for DINO the run's last k-NN
accuracy; mIoU and CorLoc of the attention and MaskCut masks per run) plus each run's overlays into the output
folder. Rows of ``results.json`` that this invocation does not run are kept, so one row can be added or redone.

Usage: PYTHONPATH=. python -m benchmarks.segmentation [--models crate_demo,vit_demo,crate_demo:dino] [--steps 600]
[--seeds 0,1] [--runs runs/segmentation] [--out benchmarks/results/segmentation-<date>]
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
    parser.add_argument("--models", default="crate_demo,vit_demo,crate_demo:dino", help="NAME or NAME:dino each")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--runs", default="runs/segmentation", help="where the training runs go")
    parser.add_argument("--out", default=f"benchmarks/results/segmentation-{today}")
    args = parser.parse_args()
    out = Path(args.out)
    runs = []
    for entry in args.models.split(","):
        name, _, task = entry.partition(":")
        for seed in args.seeds.split(","):
            runs.append(_train_and_segment(name, task or "classify", int(seed), args.steps, Path(args.runs), out))
    done = {_key(r) for r in runs}
    kept = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else []
    rows = [r for r in kept if _key(r) not in done] + runs
    columns = ["model", "task", "seed", "steps", "accuracy", *(f"{m} {s}" for m in METHODS for s in ("mIoU", "CorLoc"))]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for r in rows:
        scores = " | ".join(f"{r[m]['miou']:.3f} | {r[m]['corloc']:.3f}" for m in METHODS)
        accuracy = f"{r['accuracy']:.3f}" if "accuracy" in r else f"{r['knn_accuracy']:.3f} (k-NN)"
        lines.append(f"| {r['model']} | {r['task']} | {r['seed']} | {r['steps']} | {accuracy} | {scores} |")
    files.write_text(out / "results.json", json.dumps(rows, indent=2) + "\n")
    files.write_text(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def _key(row: dict) -> tuple:
    return row["model"], row["task"], row["seed"]


def _train_and_segment(name: str, task: str, seed: int, steps: int, runs: Path, out: Path) -> dict:
    folder = f"{name}-seed{seed}" if task == "classify" else f"{name}-{task}-seed{seed}"
    run, scored = runs / folder, out / folder
    flags = [*RECIPE.split(), "--model", name, *(["--task", task] if task != "classify" else [])]
    flags += ["--steps", str(steps), "--seed", str(seed)]
    command = [sys.executable, "-m", "crate_kernels.train", *flags, "--out", str(run), "--progress", "false"]
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
    segment_args = ["--checkpoint", str(run), "--out", str(scored), "--progress", "0"]
    if not (scored / "segmentation.json").is_file() and crate_segment(segment_args) != 0:
        raise SystemExit(f"crate-segment failed on {run}")
    report = json.loads((scored / "segmentation.json").read_text())
    if "accuracy" not in report:  # a self-supervised backbone: the run's own monitor, k-NN on the teacher's features
        evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_acc" in line]
        report["knn_accuracy"] = evals[-1]["eval_accuracy"]
    return report | {"task": task, "seed": seed, "steps": steps, "command": " ".join(command[1:])}


if __name__ == "__main__":
    main()
