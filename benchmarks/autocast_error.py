"""How far each model family's outputs are from an fp64 evaluation of the same weights under autocast: ours (per
backend) against upstream's own op sequence (reference/) under the same autocast.

Prints a markdown table: max-abs and root-mean-square error of ours and of upstream, and their ratios (the tests hold
the RMS ratio ≤ 1.25: tests/models/test_mixed_precision.py).

Usage: PYTHONPATH=. python -m benchmarks.autocast_error [--size 384,12,6] [--batch 4] [--backends torch,triton]
[--dtype bf16]   (CPU tensors, or CUDA when present; the Triton backend on CPU needs TRITON_INTERPRET=1)
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
    args = parser.parse_args()
    dim, depth, heads = (int(v) for v in args.size.split(","))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{args.dtype} autocast, dim {dim}, depth {depth}, heads {heads}, batch {args.batch}, on {card}")
    print("| family | backend | max ours | max upstream | ratio | RMS ours | RMS upstream | ratio | time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for family in args.families.split(","):
        for backend in args.backends.split(","):
            crate_kernels.set_backend(backend)
            start = time.perf_counter()
            err = output_errors(build(family, dim, depth, heads, args.batch), dtype, device)
            largest = [e.max().item() for e in err]
            rms = [e.square().mean().sqrt().item() for e in err]
            print(
                f"| {family} | {backend} | {largest[0]:.3g} | {largest[1]:.3g} | {largest[0] / largest[1]:.2f} "
                f"| {rms[0]:.3g} | {rms[1]:.3g} | {rms[0] / rms[1]:.2f} | {time.perf_counter() - start:.0f} s |",
                flush=True,
            )


if __name__ == "__main__":
    main()
