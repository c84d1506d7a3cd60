"""MSSA attention core, softmax(s · w wᵀ) w with q = k = v = w: crate_kernels' fused Triton op against the baselines.

Providers: the Triton kernels (GPU only), upstream eager (``reference.mssa.mssa_ref``: matmul, softmax, matmul) and
``torch.compile`` of it, crate_kernels' PyTorch path (SDPA(w, w, w), default dispatch), SDPA under each explicit
backend (flash, efficient, cuDNN), FlexAttention and xformers (GPU only; a provider that cannot take a row is skipped
with the error's first line). Modes fwd / bwd / fwd_bwd. The input is the projection's (B, N, H, P) tensor and every
provider reads its (B, H, N, P) transpose, as the MSSA module does.

Shapes (GPU): the op shapes of the presets, plus the CRATE-B and CRATE-S heads (P = 64, 48) at the token counts of
other image sizes (224/14 → 257, 384/16 → 577, 512/16 → 1025; B = 256 up to 257 tokens, 64 beyond) and CRATE-LM-B at
contexts 512 and 2048; CRATE-B/16 at B = 256 first, so a time-limited run measures the goal row first.
"""

import dataclasses
import functools
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import crate_kernels
from benchmarks.shapes import (
    OP_MODES,
    TORCH_PATH,
    TRITON,
    UPSTREAM_COMPILE,
    UPSTREAM_EAGER,
    BenchShape,
    Provider,
    attention_flops,
    bench_dtypes,
    dtype_name,
    op_shapes,
    providers,
)
from reference.mssa import mssa_ref

SDPA_FLASH = Provider("sdpa_flash", ours=False, gpu_only=True)
SDPA_EFFICIENT = Provider("sdpa_efficient", ours=False, gpu_only=True)
SDPA_CUDNN = Provider("sdpa_cudnn", ours=False, gpu_only=True)
FLEX = Provider("flex_attention", ours=False, gpu_only=True)
XFORMERS = Provider("xformers", ours=False, gpu_only=True)
_SDPA_BACKENDS = {SDPA_FLASH: "FLASH_ATTENTION", SDPA_EFFICIENT: "EFFICIENT_ATTENTION", SDPA_CUDNN: "CUDNN_ATTENTION"}


def _with_tokens(shape: BenchShape, tokens: int, batch: int) -> BenchShape:
    return BenchShape(dataclasses.replace(shape.model, tokens=tokens), batch)


def mssa_shapes() -> list[BenchShape]:
    """GPU: the preset op shapes with an N sweep for the CRATE-B/S heads and the LM context; CPU: the smoke shapes."""
    shapes = op_shapes()
    if not torch.cuda.is_available():
        return shapes
    sweep = []
    for shape in shapes:
        if shape.model.short in ("crate_b", "crate_s"):
            sweep += [_with_tokens(shape, 1 + (size // patch) ** 2, 256 if size == 224 else 64)
                      for size, patch in ((224, 14), (384, 16), (512, 16))]  # fmt: skip
        if shape.causal:
            sweep += [_with_tokens(shape, n, shape.B * shape.N // n) for n in (512, 2048) if n != shape.N]
    return sorted(shapes + sweep, key=lambda s: (s.model.short != "crate_b" or s.N != 197, s.model.short, s.N))


SHAPES = mssa_shapes()


def _sdpa(sdp_backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(w: torch.Tensor, is_causal: bool) -> torch.Tensor:
        with sdpa_kernel(getattr(SDPBackend, sdp_backend)):
            return F.scaled_dot_product_attention(w, w, w, is_causal=is_causal)

    return run


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    @functools.cache
    def causal_mask(N: int, device: torch.device):  # built once per shape, outside the timed calls
        return create_block_mask(lambda b, h, q, k: q >= k, None, None, N, N, device=device)

    def run(w: torch.Tensor, is_causal: bool) -> torch.Tensor:
        return compiled(w, w, w, block_mask=causal_mask(w.shape[-2], w.device) if is_causal else None)

    return run


def _xformers(w: torch.Tensor, is_causal: bool) -> torch.Tensor:
    import xformers.ops as xops

    x = w.transpose(1, 2)  # xformers takes (B, N, H, P)
    bias = xops.LowerTriangularMask() if is_causal else None
    return xops.memory_efficient_attention(x, x, x, attn_bias=bias).transpose(1, 2)


def _core(provider: Provider):
    """The provider's (w (B, H, N, P), is_causal) -> (B, H, N, P)."""
    if provider.ours:
        return lambda w, is_causal: crate_kernels.mssa(w, is_causal=is_causal)
    if provider in _SDPA_BACKENDS:
        return _sdpa(_SDPA_BACKENDS[provider])
    if provider is FLEX:
        return _flex()
    if provider is XFORMERS:
        if importlib.util.find_spec("xformers") is None:
            pytest.skip("xformers: not installed on this machine")
        return _xformers
    return provider.maybe_compile(lambda w, is_causal: mssa_ref(w, is_causal=is_causal))


def _bytes(shape: BenchShape, dtype: torch.dtype, mode: str) -> float:
    """Compulsory traffic: fwd reads w, writes out and lse; bwd reads w, dO, out and lse, writes dw (and Δ)."""
    tensor, rows = shape.B * shape.H * shape.N * shape.P * dtype.itemsize, shape.B * shape.H * shape.N * 4
    fwd, bwd = 2 * tensor + rows, 4 * tensor + 2 * rows
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


@pytest.mark.parametrize(
    "provider",
    providers(
        TRITON, SDPA_FLASH, SDPA_CUDNN, SDPA_EFFICIENT, TORCH_PATH, FLEX, XFORMERS, UPSTREAM_EAGER, UPSTREAM_COMPILE
    ),
)
@pytest.mark.parametrize("dtype", bench_dtypes(), ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", OP_MODES)
def bench_mssa(bench, mode: str, shape: BenchShape, dtype: torch.dtype, provider: Provider) -> None:
    core, grad = _core(provider), mode != "fwd"

    def fn(x: torch.Tensor) -> torch.Tensor:
        return core(x.transpose(1, 2), shape.causal)

    fn = torch.no_grad()(fn) if not grad else fn

    def make_inputs() -> tuple[torch.Tensor]:
        # The projection output (B, N, H·P) viewed (B, N, H, P): the leaf whose gradient the backward produces.
        return (torch.randn(shape.B, shape.N, shape.H, shape.P, device=bench.device, dtype=dtype, requires_grad=grad),)

    saved = crate_kernels.get_backend()
    crate_kernels.set_backend(provider.backend or saved)
    try:
        fn(*make_inputs())  # an SDPA backend without a kernel for this P or dtype raises here: skip, saying why
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"{provider.name} cannot run {shape.id} in {dtype_name(dtype)}: {str(error).splitlines()[0]}")
    finally:
        crate_kernels.set_backend(saved)
    bench(
        fn,
        make_inputs,
        mode=mode,
        provider=provider,
        op="mssa",
        shape=shape,
        dtype=dtype,
        flops=attention_flops(shape.B, shape.H, shape.N, shape.P, shape.causal, mode),
        nbytes=_bytes(shape, dtype, mode),
    )
