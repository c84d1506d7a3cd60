"""Shared test tools: the tolerance table, the comparison rule against reference/, the parameters every op suite
shares (backends, dtypes, random seeds), shape lists with readable ids, compiling for Hopper without a GPU."""

import os
from typing import NamedTuple

import pytest
import torch

import crate_kernels
from crate_kernels import backend


class Tolerance(NamedTuple):
    atol: float
    rtol: float
    floor: float  # least absolute slack added to twice the low-precision reference's error (rule a)


# Rule (b) of docs/design.md, 'Numerics rules': per-dtype ceilings (xformers' attention numbers), forward and backward.
TOLERANCES: dict[tuple[torch.dtype, str], Tolerance] = {
    (torch.float64, "fwd"): Tolerance(1e-10, 1e-10, 1e-12),
    (torch.float64, "bwd"): Tolerance(1e-10, 1e-10, 1e-12),
    (torch.float32, "fwd"): Tolerance(1e-4, 1e-5, 1e-6),
    (torch.float32, "bwd"): Tolerance(1e-4, 1e-5, 1e-6),
    (torch.float16, "fwd"): Tolerance(4e-3, 4e-3, 1e-4),
    (torch.float16, "bwd"): Tolerance(2e-2, 2e-2, 1e-3),
    (torch.bfloat16, "fwd"): Tolerance(2e-2, 2e-2, 1e-3),
    (torch.bfloat16, "bwd"): Tolerance(1e-1, 1e-1, 1e-2),
}


def _describe(err: torch.Tensor) -> str:
    worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape)) if err.numel() else ()
    return f"max error {err.max().item():.3e} at {worst}, mean error {err.mean().item():.3e}"


def assert_close_to_ref(
    name: str,
    actual: torch.Tensor,
    expected: torch.Tensor,
    low_precision_ref: torch.Tensor | None = None,
    *,
    kind: str = "fwd",
) -> None:
    """``actual`` (any dtype) against ``expected`` (reference in fp64), by docs/design.md, 'Numerics rules'.

    (a) error ≤ 2 × error of ``low_precision_ref`` (the reference run in actual's dtype) + floor, when given;
    (b) |actual − expected| ≤ atol + rtol·|expected| with the dtype's ceilings.
    NaN must appear exactly where the reference has NaN; ±Inf must match.
    """
    tol = TOLERANCES[(actual.dtype, kind)]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
    actual64, expected64 = actual.detach().double().cpu(), expected.detach().double().cpu()
    nan_a, nan_e = actual64.isnan(), expected64.isnan()
    assert torch.equal(nan_a, nan_e), f"{name}: NaN at {int(nan_a.sum())} places, reference at {int(nan_e.sum())}"
    inf_e = expected64.isinf()
    assert torch.equal(actual64[inf_e], expected64[inf_e]), f"{name}: infinities differ from the reference"
    finite = ~(nan_e | inf_e)
    err = torch.where(finite, actual64 - expected64, 0.0).abs()
    bound = tol.atol + tol.rtol * torch.where(finite, expected64, 0.0).abs()
    assert bool((err <= bound).all()), f"{name} ({actual.dtype}, {kind}) beyond atol/rtol {tol[:2]}: {_describe(err)}"
    if low_precision_ref is not None:
        ref_err = torch.where(finite, low_precision_ref.detach().double().cpu() - expected64, 0.0).abs()
        # FlashAttention's test rule adds twice the rounding of the values themselves in actual's dtype (its
        # ((ref + 0.3) − 0.3) − ref); we take that spacing exactly, eps · max|ref|, rather than its luck of the draw.
        rounding = torch.finfo(actual.dtype).eps * torch.where(finite, expected64, 0.0).abs().max().item()
        limit = 2 * ref_err.max().item() + max(tol.floor, 2 * rounding)
        assert err.max().item() <= limit, (
            f"{name} ({actual.dtype}, {kind}): {_describe(err)} > 2 × reference's own error "
            f"{ref_err.max().item():.3e} + {max(tol.floor, 2 * rounding):.1e}"
        )


def quick(params: list) -> list:
    """The whole list, or its first two entries under ``pytest --quick``."""
    return params[:2] if os.environ.get("CRATE_KERNELS_QUICK_TESTS") == "1" else params


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


BACKENDS = ["torch", "triton"]
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The autocast dtypes, CPU and CUDA alike.
AUTOCAST_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
# 20 seeded random shapes everywhere, 200 on a GPU.
RANDOM_SEEDS = [*range(20), *(pytest.param(s, marks=pytest.mark.gpu) for s in range(20, 200))]


def dtype_params(gpu_only: tuple[torch.dtype, ...] = ()) -> list:
    """``KERNEL_DTYPES`` as pytest params with readable ids (fp32, fp16, bf16); those in ``gpu_only`` marked ``gpu``."""
    ids = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    return [pytest.param(d, id=ids[d], marks=[pytest.mark.gpu] if d in gpu_only else []) for d in KERNEL_DTYPES]


def use_backend(name: str) -> None:
    """Select a backend; "triton" needs CUDA or the interpreter, exactly as the dispatch rule says (else skip)."""
    if name == "triton" and not (torch.cuda.is_available() or backend.interpreting()):
        pytest.skip("the Triton kernels need a CUDA device or TRITON_INTERPRET=1")
    crate_kernels.set_backend(name)


def compile_for_hopper(
    kernel,
    types: dict[str, str],
    constexprs: dict[str, object],
    num_warps: int = 4,
    num_stages: int = 2,
    shared_memory: bool = False,
) -> str | int:
    """Compile one ``@triton.jit`` kernel to sm_90 with Triton's own ptxas, no GPU needed, and return its PTX.

    The interpreter never compiles, so this is what catches on CPU what only the compiler rejects (types, dot shapes
    under 16, Hopper's wgmma not taken). ``types`` maps argument names to Triton types (``*bf16``, ``fp32``; ``i32``
    where absent); ``constexprs`` fixes the rest. Needs real ``@triton.jit`` objects: call it in a process without
    TRITON_INTERPRET (see ``run_without_interpreter``). With ``shared_memory``, the bytes of shared memory instead.
    """
    from benchmarks.compiled import compile_kernel

    compiled, _ = compile_kernel(kernel, types, constexprs, {"num_warps": num_warps, "num_stages": num_stages})
    return compiled.metadata.shared if shared_memory else compiled.asm["ptx"]


HOPPER_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)


def assert_configs_fit_hopper(
    kernel, types: dict[str, str], constexprs: dict[str, object], configs: list, what: str = ""
) -> None:
    """Every autotune config in ``configs``, compiled for sm_90, takes at most ``HOPPER_MAX_SHARED`` bytes of shared
    memory (a launch above it fails with OutOfResources); same rules as ``compile_for_hopper``."""
    for config in configs:
        shared = compile_for_hopper(
            kernel, types, constexprs | config.kwargs, config.num_warps, config.num_stages, shared_memory=True
        )
        assert shared <= HOPPER_MAX_SHARED, f"{what}{config}: {shared} B of shared memory"


def run_without_interpreter(code: str, timeout: float = 300) -> str:
    """Run Python ``code`` from the repository root in a fresh process with TRITON_INTERPRET unset; its stdout, or
    fail with its stderr."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
