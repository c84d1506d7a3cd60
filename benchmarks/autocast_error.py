"""How far each model family's outputs are from an fp64 evaluation of the same weights under autocast: ours (per
backend) against upstream's own op sequence (reference/) under the same autocast.

Prints a markdown table: max-abs and root-mean-square error of ours and of upstream, and their ratios (the tests hold
the RMS ratio ≤ 1.25: tests/models/test_mixed_precision.py). With several seeds (weights and inputs drawn per seed) the
errors are means over seeds and the RMS ratio's spread is printed beside them: at small widths one rounding flip moves
it by tens of percent from seed to seed.

Usage: PYTHONPATH=. python -m benchmarks.autocast_error [--size 384,12,6] [--batch 4] [--backends torch,triton]
[--dtype bf16] [--seeds 0,1,2]   (CPU tensors, or CUDA when present; the Triton backend on CPU needs TRITON_INTERPRET=1)
"""

import argparse
import time

import torch

import crate_kernels
from tests.models.test_mixed_precision import FAMILIES, build, output_errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="384,12,6", help="dim,depth,heads (default: CRATE-T's width and depth)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--backends", default="torch,triton")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds of the weights and inputs")
    args = parser.parse_args()
    dim, depth, heads = (int(v) for v in args.size.split(","))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    seeds = [int(v) for v in args.seeds.split(",")]
    print(
        f"{args.dtype} autocast, dim {dim}, depth {depth}, heads {heads}, batch {args.batch}, seeds {seeds}, on {card}"
    )
    print(
        "| family | backend | max ours | max upstream | ratio | RMS ours | RMS upstream | ratio "
        "| RMS ratio per seed | time |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for family in args.families.split(","):
        for backend in args.backends.split(","):
            crate_kernels.set_backend(backend)
            start = time.perf_counter()
            largest, rms = torch.zeros(len(seeds), 2), torch.zeros(len(seeds), 2)
            for i, seed in enumerate(seeds):
                err = output_errors(build(family, dim, depth, heads, args.batch, seed), dtype, device)
                largest[i] = torch.stack([e.max() for e in err])
                rms[i] = torch.stack([e.square().mean().sqrt() for e in err])
            per_seed = " ".join(f"{r:.2f}" for r in (rms[:, 0] / rms[:, 1]).tolist())
            (max_ours, max_up), (rms_ours, rms_up) = largest.mean(0).tolist(), rms.mean(0).tolist()
            print(
                f"| {family} | {backend} | {max_ours:.3g} | {max_up:.3g} | {max_ours / max_up:.2f} "
                f"| {rms_ours:.3g} | {rms_up:.3g} | {rms_ours / rms_up:.2f} | {per_seed} "
                f"| {time.perf_counter() - start:.0f} s |",
                flush=True,
            )


if __name__ == "__main__":
    main()
