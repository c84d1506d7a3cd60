"""Overcomplete ISTA (CRATE-α with D1 and residual; crate-lm with its shared dictionary): four fused Triton GEMMs
against upstream's einsum chain.

Providers: upstream eager (``reference.ista.ista_overcomplete_ref``), ``torch.compile`` of it (default and
max-autotune, GPU only), crate_kernels' PyTorch path, and the Triton kernels (GPU only). Modes fwd / bwd / fwd_bwd.
Also the first GEMM alone, ``relu(η·xD − ηλ)`` fused, against cuBLAS ``torch.matmul(x, D)`` on the same shape.
Shapes: the overcomplete presets of ``op_shapes()`` (CRATE-α B/16 on GPU: D = 768, m = 4D, N = 197, B = 256; a causal
(crate-lm) preset, when listed there, runs the shared-dictionary variant); max-autotune rows last.
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
    ista_overcomplete_flops,
    op_shapes,
    providers,
    time_gemm,
)
from crate_kernels.ops.gemm import gemm_epilogue
from reference.ista import ista_overcomplete_ref

SHAPES = headline_first([s for s in op_shapes() if s.model.overcomplete], batches=(256,))


def _dictionary(D: int, m: int, device: torch.device, dtype: torch.dtype, grad: bool) -> torch.Tensor:
    return ((torch.rand(D, m, device=device) * 2 - 1) * (6 / m) ** 0.5).to(dtype).requires_grad_(grad)


def _bench_ista_overcomplete(bench, mode: str, shape: BenchShape, dtype: torch.dtype, provider: Provider) -> None:
    """CRATE-α (not causal): D_out = D1 and the block input as residual; crate-lm (causal): shared D, no residual."""
    device, grad, alpha = bench.device, mode != "fwd", not shape.causal
    T, D, m = shape.B * shape.N, shape.D, shape.model.overcomplete * shape.D
    kwargs = {"step_size": STEP_SIZE, "lambd": LAMBD}
    if provider.ours:
        fn = lambda x, D, D_out: crate_kernels.ista_overcomplete(x, D, D_out, residual=x if alpha else None, **kwargs)  # noqa: E731
    else:
        fn = provider.maybe_compile(
            lambda x, D, D_out: ista_overcomplete_ref(x, D, D_out, residual=x if alpha else None, **kwargs)
        )
    fn = torch.no_grad()(fn) if not grad else fn

    def make_inputs() -> tuple:
        x = torch.randn(shape.B, shape.N, D, device=device, dtype=dtype, requires_grad=grad)
        return x, _dictionary(D, m, device, dtype, grad), _dictionary(D, m, device, dtype, grad) if alpha else None

    es = torch.finfo(dtype).bits // 8
    dictionaries = (2 if alpha else 1) * D * m
    # fwd: x, dictionaries read, out written; bwd: dOut, x read, dx written, dictionaries read and their grads written.
    fwd_bytes, bwd_bytes = (2 * T * D + dictionaries) * es, (3 * T * D + 2 * dictionaries) * es
    bench(
        fn,
        make_inputs,
        mode=mode,
        provider=provider,
        op="ista_overcomplete",
        shape=shape,
        dtype=dtype,
        flops=ista_overcomplete_flops(T, D, m, mode),
        nbytes={"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd_bwd": fwd_bytes + bwd_bytes}[mode],
    )


@pytest.mark.parametrize("provider", providers(TRITON, UPSTREAM_EAGER, UPSTREAM_COMPILE, TORCH_PATH))
@pytest.mark.parametrize("dtype", bench_dtypes(), ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", OP_MODES)
def bench_ista_overcomplete(bench, mode: str, shape: BenchShape, dtype: torch.dtype, provider: Provider) -> None:
    _bench_ista_overcomplete(bench, mode, shape, dtype, provider)


@pytest.mark.parametrize("provider", providers(TRITON_GEMM, CUBLAS))
@pytest.mark.parametrize("dtype", bench_dtypes(), ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def bench_ista_overcomplete_gemm(bench, shape: BenchShape, dtype: torch.dtype, provider: Provider) -> None:
    """Step 1, ``relu(η·xD − ηλ)`` with its epilogue fused, against the bare cuBLAS product x·D, (B·N, D) × (D, 4D)."""
    device, T, D, m = bench.device, shape.B * shape.N, shape.D, shape.model.overcomplete * shape.D

    def make_inputs() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(T, D, device=device, dtype=dtype), _dictionary(D, m, device, dtype, False)

    def fused(x: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
        return gemm_epilogue(x, dictionary, alpha=STEP_SIZE, threshold=STEP_SIZE * LAMBD, relu=True)

    time_gemm(bench, "ista_overcomplete_gemm", shape, dtype, provider, make_inputs, fused)


@pytest.mark.parametrize("provider", providers(UPSTREAM_COMPILE_MAX))
@pytest.mark.parametrize("dtype", bench_dtypes(), ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", OP_MODES)
def bench_ista_overcomplete_max_autotune(bench, mode, shape: BenchShape, dtype: torch.dtype, provider) -> None:
    """Last in the file: minutes of autotuning must not crowd out the other rows of a time-limited run."""
    _bench_ista_overcomplete(bench, mode, shape, dtype, provider)
