"""Vanilla ISTA (CRATE, CRATE-MAE encoder): crate_kernels' one-GEMM Triton op against upstream's three matmuls.

Providers: upstream eager (``reference.ista.ista_ref``), ``torch.compile`` of it (default and max-autotune, GPU only),
crate_kernels' PyTorch M-form path, and the Triton kernels (GPU only). Modes fwd / bwd / fwd_bwd. Also the main GEMM
alone, ``relu(x·M + x − ηλ)`` fused, against cuBLAS ``torch.matmul(x, M)`` on the same (B·N, D) × (D, D) shape.

Shapes: the vanilla CRATE presets (T/S/B/L at 224/16, N = 197) at B = 256 and 64 on GPU, CRATE-B first so a
time-limited run (gpu_check.sh) measures the goal's row (B = 256, bf16, fwd_bwd) before the others;
max-autotune rows come last for the same reason.
"""

import pytest
import torch

import crate_kernels
from benchmarks.shapes import (
    CUBLAS,
    LAMBD,
    OP_MODES,
    STEP_SIZE,
    TORCH_PATH,
    TRITON,
    TRITON_GEMM,
    UPSTREAM_COMPILE,
    UPSTREAM_COMPILE_MAX,
    UPSTREAM_EAGER,
    BenchShape,
    Provider,
    bench_dtypes,
    dtype_name,
    headline_first,
    ista_flops,
    op_shapes,
    providers,
    time_gemm,
)
from crate_kernels.ops.gemm import gemm_epilogue
from crate_kernels.ops.ista import ista_dictionary_operator
from reference.ista import ista_ref

SHAPES = headline_first([s for s in op_shapes() if not s.causal and s.model.overcomplete == 0])


def _ista_fn(provider: Provider):
    if provider.ours:
        return lambda x, weight: crate_kernels.ista(x, weight, step_size=STEP_SIZE, lambd=LAMBD)
    return provider.maybe_compile(lambda x, weight: ista_ref(x, weight, STEP_SIZE, LAMBD))


def _bench_ista(bench, mode: str, shape: BenchShape, dtype: torch.dtype, provider: Provider) -> None:
    device, grad = bench.device, mode != "fwd"
    T, D = shape.B * shape.N, shape.D
    fn = _ista_fn(provider)
    fn = torch.no_grad()(fn) if not grad else fn

    def make_inputs() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(shape.B, shape.N, D, device=device, dtype=dtype, requires_grad=grad)
        weight = ((torch.rand(D, D, device=device) * 2 - 1) * (6 / D) ** 0.5).to(dtype).requires_grad_(grad)
        return x, weight

    es = torch.finfo(dtype).bits // 8
    # fwd: x, weight read, out written; bwd: dOut, x, out, weight read, dx, dweight written.
    fwd_bytes, bwd_bytes = (2 * T * D + D * D) * es, (4 * T * D + 2 * D * D) * es
    bench(
        fn,
        make_inputs,
        mode=mode,
        provider=provider,
        op="ista",
        shape=shape,
        dtype=dtype,
        flops=ista_flops(T, D, mode),
        nbytes={"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd_bwd": fwd_bytes + bwd_bytes}[mode],
    )


@pytest.mark.parametrize("provider", providers(TRITON, UPSTREAM_EAGER, UPSTREAM_COMPILE, TORCH_PATH))
@pytest.mark.parametrize("dtype", bench_dtypes(), ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", OP_MODES)
def bench_ista(bench, mode: str, shape: BenchShape, dtype: torch.dtype, provider: Provider) -> None:
    _bench_ista(bench, mode, shape, dtype, provider)


@pytest.mark.parametrize("provider", providers(TRITON_GEMM, CUBLAS))
@pytest.mark.parametrize("dtype", bench_dtypes(), ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def bench_ista_gemm(bench, shape: BenchShape, dtype: torch.dtype, provider: Provider) -> None:
    """``relu(x·M + x − ηλ)`` (residual, threshold and relu fused) against the bare cuBLAS product x·M."""
    device, T, D = bench.device, shape.B * shape.N, shape.D

    def make_inputs() -> tuple[torch.Tensor, torch.Tensor]:
        weight = (torch.rand(D, D, device=device) * 2 - 1) * (6 / D) ** 0.5
        return torch.randn(T, D, device=device, dtype=dtype), ista_dictionary_operator(weight, STEP_SIZE).to(dtype)

    def fused(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        return gemm_epilogue(x, M, residual=x, threshold=STEP_SIZE * LAMBD, relu=True)

    time_gemm(bench, "ista_gemm", shape, dtype, provider, make_inputs, fused)


@pytest.mark.parametrize("provider", providers(UPSTREAM_COMPILE_MAX))
@pytest.mark.parametrize("dtype", bench_dtypes(), ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", OP_MODES)
def bench_ista_max_autotune(bench, mode: str, shape: BenchShape, dtype: torch.dtype, provider: Provider) -> None:
    """Last in the file: minutes of autotuning must not crowd out the other rows of a time-limited run."""
    _bench_ista(bench, mode, shape, dtype, provider)
