"""Model-level suites: one CRATE layer (LN + MSSA + LN + ISTA) and one whole training step (forward, backward, AdamW).

Providers: upstream eager (``reference/``), ``torch.compile`` of it (default and max-autotune), crate_kernels on the
PyTorch path, crate_kernels' Triton kernels, and those under ``torch.compile``. Every provider starts from the same
upstream model (reference/) of a registered preset; ours swap in crate_kernels' modules with
``crate_kernels.apply_crate_kernels`` (the same parameter tensors). Models run in the bench dtype (bf16 on
GPU) with AdamW on those parameters, the same for every provider.

The black-box baseline runs beside them: the ViT of each preset's width, depth and patch (``vit_*``, the name with
``crate_`` swapped; none for CRATE-α and the LM), eager and compiled, in rows of its own op (``vit_layer``,
``vit_train_step``) so that CRATE's speed-ups stay measured against CRATE's upstream.
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
    is_language_model,
    layer_flops,
    model_shapes,
    op_shapes,
    optimizer_step,
    parameter_bytes,
    providers,
    tensor_bytes,
    train_step_flops,
)
from crate_kernels.models.crate_lm import from_upstream_state_dict
from reference import crate_lm as reference_crate_lm

# max-autotune last: under a time budget (gpu_check.sh) its minutes of autotuning must not crowd out the other rows.
ALL_PROVIDERS = providers(UPSTREAM_EAGER, UPSTREAM_COMPILE, TORCH_PATH, TRITON, TRITON_COMPILE, UPSTREAM_COMPILE_MAX)
VIT_EAGER = Provider("vit_eager", ours=False)
VIT_COMPILE = Provider("vit_compile", ours=False, gpu_only=True, compile_mode="default")
VIT_PROVIDERS = (VIT_EAGER, VIT_COMPILE)
WITH_VIT = ALL_PROVIDERS + providers(*VIT_PROVIDERS)


def _op(provider: Provider, op: str) -> str:
    """The op a row reports: ``op``, or for the ViT baseline its own (``crate_layer`` -> ``vit_layer``)."""
    return "vit_" + op.removeprefix("crate_") if provider in VIT_PROVIDERS else op


def _model_for(provider: Provider, shape: BenchShape, device: torch.device, dtype: torch.dtype, **overrides):
    """The preset's model as ``provider`` runs it, in ``dtype``: upstream's (reference/) for the baselines; for ours,
    the same model with crate_kernels' modules swapped in by ``apply_crate_kernels`` (same parameter tensors) or, for
    the language model (whose upstream classes that function does not patch), crate_kernels' CRATELM holding upstream's
    weights. Compiled when the provider asks. ``overrides`` go to the preset (``depth=1`` for one layer)."""
    torch.manual_seed(0)
    if provider in VIT_PROVIDERS:
        twin = shape.model.name.replace("crate_", "vit_", 1)
        if twin not in crate_kernels.list_models():
            pytest.skip(f"no ViT baseline of {shape.model.name}'s family")
        with torch.device(device):
            return crate_kernels.create_model(twin, **overrides).to(dtype)
    upstream = build_upstream(shape.model.name, device, **overrides)
    if not provider.ours:
        model = upstream
    elif is_language_model(shape.model.name):
        with torch.device(device):
            model = crate_kernels.create_model(shape.model.name, **overrides)
        model.load_state_dict(from_upstream_state_dict(upstream.state_dict()))
    else:
        crate_kernels.apply_crate_kernels(upstream)
        model = upstream
    return model.to(dtype)


def _one_layer(model: nn.Module) -> nn.Module:
    """The layer stack of a one-layer model: ``transformer`` (crate_kernels, reference classifiers) or upstream
    crate-lm's only block."""
    return model.transformer.h[0] if isinstance(model, reference_crate_lm.CRATE) else model.transformer


def _loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each family's training loss as its users compute it (upstream crate-lm computes it inside ``forward``)."""
    if isinstance(model, reference_crate_lm.CRATE):
        return model(inputs, targets)[1]
    return F.cross_entropy(model(inputs).flatten(0, -2), targets.flatten())


@pytest.mark.parametrize("provider", WITH_VIT)
@pytest.mark.parametrize("dtype", bench_dtypes(), ids=dtype_name)
@pytest.mark.parametrize("shape", op_shapes(), ids=str)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def bench_layer(bench, mode: str, shape: BenchShape, dtype: torch.dtype, provider: Provider) -> None:
    device = bench.device
    layer = _one_layer(_model_for(provider, shape, device, dtype, depth=1))
    nbytes = parameter_bytes(layer) * (1 if mode == "fwd" else 3)  # fwd_bwd: read twice, gradient written once
    run = provider.maybe_compile(layer)
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
        op=_op(provider, "crate_layer"),
        shape=shape,
        dtype=dtype,
        flops=layer_flops(shape, mode),
        nbytes=nbytes + activation * (2 if mode == "fwd" else 4),  # x, out (+ dout, dx)
    )


@pytest.mark.parametrize("provider", WITH_VIT)
@pytest.mark.parametrize("dtype", bench_dtypes(), ids=dtype_name)
@pytest.mark.parametrize("shape", model_shapes(), ids=str)
def bench_train_step(bench, shape: BenchShape, dtype: torch.dtype, provider: Provider) -> None:
    device, m = bench.device, shape.model
    model = _model_for(provider, shape, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # AdamW reads p, g, m, v and writes p, m, v; forward and backward read p, backward writes g: ~10 passes.
    nbytes = 10 * parameter_bytes(model)
    forward = provider.maybe_compile(model)

    def make_inputs() -> tuple[torch.Tensor, torch.Tensor]:
        if m.causal:  # next-token prediction on random token ids
            tokens = torch.randint(0, m.head_out, (shape.B, shape.N + 1), device=device)
            return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # as nanoGPT batches them
        images = torch.randn(shape.B, m.channels, m.image_size, m.image_size, device=device, dtype=dtype)
        return images, torch.randint(0, m.head_out, (shape.B,), device=device)

    bench(
        optimizer_step(optimizer, lambda inputs, targets: _loss(forward, inputs, targets)),
        make_inputs,
        mode="train_step",
        provider=provider,
        op=_op(provider, "train_step"),
        shape=shape,
        dtype=dtype,
        flops=train_step_flops(shape),
        nbytes=nbytes + tensor_bytes(*make_inputs()),
    )
