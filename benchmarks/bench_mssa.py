"""MSSA attention core, softmax(s · w wᵀ) w with q = k = v = w: provider × shape × dtype × mode (fwd / bwd / fwd_bwd).

Providers: our Triton kernels, upstream eager (``reference.mssa_ref``), SDPA(w, w, w) under each explicit backend
(flash, efficient, cuDNN, math), FlexAttention, xformers when installed. A provider that cannot run here is skipped
with the reason; nothing is estimated. Every result carries its card, FLOPs (DESIGN §5: forward 4·B·H·N²·P, half when
causal, backward 2.5× the forward) and the least HBM bytes a fused kernel moves.

Run (GPU: CRATE and causal-LM shapes in bf16; CPU: tiny shapes, GPU-only providers skipped)::

    PYTHONPATH=. python -m pytest benchmarks/bench_mssa.py -o python_files='bench_*.py' \\
        -o python_functions='bench_*' --benchmark-json=benchmarks/results/mssa.json
"""

import functools
import importlib.util
import platform
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import crate_kernels
from crate_kernels import backend
from reference.mssa import mssa_ref

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
CARD = torch.cuda.get_device_name() if CUDA else f"cpu ({platform.processor() or platform.machine()})"

# CRATE presets with P ∈ {48, 64} (DESIGN §1.4): small = 12 heads × 48, base = 12 heads × 64. Token counts 1 + (S/p)²:
# 224 at patch 16 and 14 (197, 257), 384 and 512 at patch 16 (577, 1025); batch 256 for the short ones, 64 otherwise.
PRESETS = {"crate_s": (12, 48), "crate_b": (12, 64)}
GPU_SHAPES = [
    (name, 256 if N <= 257 else 64, H, N, P, False) for name, (H, P) in PRESETS.items() for N in (197, 257, 577, 1025)
] + [("crate_lm", 8, 12, N, 64, True) for N in (512, 1024, 2048)]
CPU_SHAPES = [("tiny", 1, 2, 33, 16, False), ("tiny_lm", 1, 2, 64, 16, True)]
SHAPES = GPU_SHAPES if CUDA else CPU_SHAPES
SHAPE_IDS = [f"{name}-B{B}-H{H}-N{N}-P{P}{'-causal' if causal else ''}" for name, B, H, N, P, causal in SHAPES]
DTYPES = [torch.bfloat16] if CUDA else [torch.float32]
MODES = ("fwd", "bwd", "fwd_bwd")


def _sdpa(sdp_backend_name: str) -> Callable[[torch.Tensor, bool], torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdp_backend = getattr(SDPBackend, sdp_backend_name)

    def run(w: torch.Tensor, is_causal: bool) -> torch.Tensor:
        with sdpa_kernel(sdp_backend):
            return F.scaled_dot_product_attention(w, w, w, is_causal=is_causal)

    return run


def _triton(w: torch.Tensor, is_causal: bool) -> torch.Tensor:
    crate_kernels.set_backend("triton")
    return crate_kernels.mssa(w, is_causal=is_causal)


def _flex() -> Callable[[torch.Tensor, bool], torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    @functools.cache
    def causal_mask(N: int, device: torch.device):  # built once per shape, outside the timing
        return create_block_mask(lambda b, h, q, k: q >= k, None, None, N, N, device=device)

    def run(w: torch.Tensor, is_causal: bool) -> torch.Tensor:
        mask = causal_mask(w.shape[-2], w.device) if is_causal else None
        return compiled(w, w, w, block_mask=mask)

    return run


def _xformers(w: torch.Tensor, is_causal: bool) -> torch.Tensor:
    import xformers.ops as xops

    bias = xops.LowerTriangularMask() if is_causal else None
    x = w.transpose(1, 2)  # xformers takes (B, N, H, P)
    return xops.memory_efficient_attention(x, x, x, attn_bias=bias).transpose(1, 2)


def _unavailable(provider: str) -> str | None:
    """Why ``provider`` cannot run on this machine, or None."""
    if provider == "triton":
        return (
            None if CUDA or backend.interpreting() else "needs CUDA (TRITON_INTERPRET=1 runs it, says nothing of speed)"
        )
    if provider in ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn") and not CUDA:
        return "SDPA's flash / efficient / cuDNN backends are CUDA kernels"
    if provider == "flex" and not CUDA:
        return "FlexAttention is measured on CUDA only (on CPU it is a compiled reference loop)"
    if provider == "xformers" and importlib.util.find_spec("xformers") is None:
        return "xformers is not installed"
    if provider == "xformers" and not CUDA:
        return "xformers has no CPU attention"
    return None


PROVIDERS: dict[str, Callable[[], Callable[[torch.Tensor, bool], torch.Tensor]]] = {
    "triton": lambda: _triton,
    "eager": lambda: lambda w, is_causal: mssa_ref(w, is_causal=is_causal),
    "sdpa_flash": lambda: _sdpa("FLASH_ATTENTION"),
    "sdpa_efficient": lambda: _sdpa("EFFICIENT_ATTENTION"),
    "sdpa_cudnn": lambda: _sdpa("CUDNN_ATTENTION"),
    "sdpa_math": lambda: _sdpa("MATH"),
    "flex": _flex,
    "xformers": lambda: _xformers,
}


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _flops_and_bytes(B: int, H: int, N: int, P: int, causal: bool, dtype: torch.dtype, mode: str) -> tuple[int, int]:
    fwd = 4 * B * H * N * N * P // (2 if causal else 1)
    flops = {"fwd": fwd, "bwd": 5 * fwd // 2, "fwd_bwd": 7 * fwd // 2}[mode]
    tile, rows = B * H * N * P * dtype.itemsize, B * H * N * 4  # one (B, H, N, P) tensor; one fp32 per row
    # fwd reads w, writes out and lse; bwd reads w, dO, out, lse, writes Δ and dw, then reads Δ.
    fwd_bytes, bwd_bytes = 2 * tile + rows, 4 * tile + 3 * rows
    return flops, {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd_bwd": fwd_bytes + bwd_bytes}[mode]


def _bench(benchmark, mode: str, provider: str, shape: tuple, dtype: torch.dtype) -> None:
    reason = _unavailable(provider)
    if reason:
        pytest.skip(f"{provider}: {reason}")
    name, B, H, N, P, causal = shape
    fn = PROVIDERS[provider]()
    w = torch.randn(B, N, H, P, device=DEVICE, dtype=dtype).transpose(1, 2)  # the projection's layout
    w.requires_grad_(mode != "fwd")
    grad_out = torch.randn(B, H, N, P, device=DEVICE, dtype=dtype)
    saved_backend = crate_kernels.get_backend()
    try:
        try:
            out = fn(w, causal)  # also compiles / autotunes outside the timing
        except (RuntimeError, NotImplementedError) as error:  # e.g. SDPA: no backend kernel for this dtype or P
            pytest.skip(f"{provider} cannot run {name} in {dtype}: {str(error).splitlines()[0]}")
        if mode == "fwd":

            def target() -> None:
                with torch.no_grad():
                    fn(w, causal)
                _sync()

        elif mode == "bwd":

            def target() -> None:
                torch.autograd.grad(out, w, grad_out, retain_graph=True)
                _sync()

        else:

            def target() -> None:
                torch.autograd.grad(fn(w, causal), w, grad_out)
                _sync()

        target()
        flops, nbytes = _flops_and_bytes(B, H, N, P, causal, dtype, mode)
        benchmark.extra_info.update(
            op="mssa", provider=provider, shape=name, B=B, H=H, N=N, P=P, causal=causal, dtype=str(dtype),
            mode=mode, flops=flops, bytes=nbytes, card=CARD,
        )  # fmt: skip
        rounds = 20 if CUDA else 3
        benchmark.pedantic(target, rounds=rounds, warmup_rounds=2 if CUDA else 1, iterations=1)
    finally:
        crate_kernels.set_backend(saved_backend)


_parametrize = [
    pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).removeprefix("torch.") for d in DTYPES]),
    pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS),
    pytest.mark.parametrize("provider", list(PROVIDERS)),
]


def _with_params(fn):
    for mark in _parametrize:
        fn = mark(fn)
    return fn


@_with_params
def bench_mssa_fwd(benchmark, provider, shape, dtype):
    _bench(benchmark, "fwd", provider, shape, dtype)


@_with_params
def bench_mssa_bwd(benchmark, provider, shape, dtype):
    _bench(benchmark, "bwd", provider, shape, dtype)


@_with_params
def bench_mssa_fwd_bwd(benchmark, provider, shape, dtype):
    _bench(benchmark, "fwd_bwd", provider, shape, dtype)
