"""Model-level suites: one CRATE layer (LN + MSSA + LN + ISTA) and one whole training step (forward, backward, AdamW).

Providers: upstream eager (``reference/``), ``torch.compile`` of it (default and max-autotune), crate_kernels on the
PyTorch path, crate_kernels' Triton kernels, and those under ``torch.compile``. Every provider starts from the same
upstream model (reference/) of a registered preset; ours swap in crate_kernels' modules with
``crate_kernels.apply_crate_kernels`` (the same parameter tensors). Models run in the bench dtype (bf16 on
GPU) with AdamW on those parameters, the same for every provider.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import crate_kernels
from benchmarks.shapes import (
    TORCH_PATH,
    TRITON,
    TRITON_COMPILE,
    UPSTREAM_COMPILE,
    UPSTREAM_COMPILE_MAX,
    UPSTREAM_EAGER,
    BenchShape,
    Provider,
    bench_dtypes,
    build_upstream,
    dtype_name,
    layer_flops,
    model_shapes,
    op_shapes,
    parameter_bytes,
    providers,
    tensor_bytes,
    train_step_flops,
)

# max-autotune last: under a time budget (gpu_check.sh) its minutes of autotuning must not crowd out the other rows.
ALL_PROVIDERS = providers(UPSTREAM_EAGER, UPSTREAM_COMPILE, TORCH_PATH, TRITON, TRITON_COMPILE, UPSTREAM_COMPILE_MAX)


def _for_provider(model: nn.Module, provider: Provider) -> nn.Module:
    """The upstream model as ``provider`` runs it: crate_kernels' modules swapped in (same parameters) for our
    providers, then compiled if the provider asks."""
    if provider.ours:
        crate_kernels.apply_crate_kernels(model)
    return provider.maybe_compile(model)


@pytest.mark.parametrize("provider", ALL_PROVIDERS)
@pytest.mark.parametrize("dtype", bench_dtypes(), ids=dtype_name)
@pytest.mark.parametrize("shape", op_shapes(), ids=str)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def bench_layer(bench, mode: str, shape: BenchShape, dtype: torch.dtype, provider: Provider) -> None:
    device = bench.device
    layer = build_upstream(shape.model.name, device, depth=1).transformer.to(dtype)
    nbytes = parameter_bytes(layer) * (1 if mode == "fwd" else 3)  # fwd_bwd: read twice, gradient written once
    run = _for_provider(layer, provider)
    fn = torch.no_grad()(run) if mode == "fwd" else run

    def make_inputs() -> tuple[torch.Tensor]:
        x = torch.randn(shape.B, shape.N, shape.D, device=device, dtype=dtype, requires_grad=mode != "fwd")
        return (x,)

    activation = tensor_bytes(*make_inputs())
    bench(
        fn,
        make_inputs,
        mode=mode,
        provider=provider,
        op="crate_layer",
        shape=shape,
        dtype=dtype,
        flops=layer_flops(shape, mode),
        nbytes=nbytes + activation * (2 if mode == "fwd" else 4),  # x, out (+ dout, dx)
    )


@pytest.mark.parametrize("provider", ALL_PROVIDERS)
@pytest.mark.parametrize("dtype", bench_dtypes(), ids=dtype_name)
@pytest.mark.parametrize("shape", model_shapes(), ids=str)
def bench_train_step(bench, shape: BenchShape, dtype: torch.dtype, provider: Provider) -> None:
    device = bench.device
    torch.manual_seed(0)
    model = build_upstream(shape.model.name, device).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # AdamW reads p, g, m, v and writes p, m, v; forward and backward read p, backward writes g: ~10 passes.
    nbytes = 10 * parameter_bytes(model)
    forward = _for_provider(model, provider)
    m = shape.model

    def make_inputs() -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randn(shape.B, m.channels, m.image_size, m.image_size, device=device, dtype=dtype)
        return images, torch.randint(0, m.head_out, (shape.B,), device=device)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(forward(images), labels).backward()
        optimizer.step()

    bench(
        step,
        make_inputs,
        mode="train_step",
        provider=provider,
        op="train_step",
        shape=shape,
        dtype=dtype,
        flops=train_step_flops(shape),
        nbytes=nbytes + tensor_bytes(*make_inputs()),
    )
