"""The launchers of the gated GEMM with epilogue that both ISTA ops run on (docs/design.md, 'The GEMM with epilogue').

``gemm_epilogue`` launches one token GEMM ``relu?(alpha · a·b + residual − threshold)``; ``gemm_token_sum`` the
split-K reduction over the tokens that gives the weight gradients. Operands may be ``Gated`` (a relu mask applied as
the kernel loads them) and are read through their strides. The kernel is ``_ista_gemm_kernel``
(``crate_kernels/kernels/ista.py``).

Dtypes: each product runs in the dictionary's dtype (the dot dtype); an activation in another dtype (fp32 under
autocast) is rounded to it as its tiles are loaded, and the epilogue adds its residual in fp32 before the one cast at
the store. So an fp32 ``x`` meets a bf16 dictionary the way upstream's autocast GEMMs meet it, and the residual stream
stays fp32.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from crate_kernels.kernels.configs import gemm_config
from crate_kernels.kernels.ista import _ista_gemm_kernel
from crate_kernels.ops.launch import capability, dot_precision, interpreter_upcast, launch, on_device


class Gated(NamedTuple):
    """An operand read as ``where(gate <= 0, 0, tensor)``: a relu mask applied as the kernel loads the tile."""

    tensor: torch.Tensor  # (rows, cols), any strides
    gate: torch.Tensor  # (rows, cols), the saved activation whose relu mask applies


Operand = torch.Tensor | Gated
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def as_tokens(t: torch.Tensor) -> torch.Tensor:
    """(..., D) as (T, D): a view whenever the leading dims collapse to one stride (contiguous batches, any slice
    of the last dim, stride-0 broadcasts); otherwise (e.g. every other token of odd-length rows) reshape makes the
    one contiguous copy the two-stride kernel needs."""
    return t.reshape(-1, t.shape[-1])


def _parts(
    t: Operand | None, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(tensor, gate, strides, gate strides); absent parts point at ``like`` with zero strides (never read)."""
    if t is None:
        return like, like, (0, 0), (0, 0)
    if isinstance(t, Gated):
        return t.tensor, t.gate, t.tensor.stride(), t.gate.stride()
    return t, t, t.stride(), (0, 0)


def _bucket(n: int) -> int:
    """A size class for the autotune key: the next power of two, capped at 2¹⁶."""
    return min(triton.next_power_of_2(max(n, 1)), 1 << 16)


def _launch(
    a: Operand,
    b: Operand,
    c: torch.Tensor,
    dot_dtype: torch.dtype,
    *,
    splits: int = 1,
    alpha: float = 1.0,
    residual: Operand | None = None,
    threshold: float = 0.0,
    relu: bool = False,
) -> None:
    """``c = relu?(alpha · a·b + residual − threshold)`` with the product in ``dot_dtype``; c is (M, N), or
    (splits, M, N) partial products."""
    a_t, a_gate, a_strides, a_gate_strides = _parts(a, c)
    b_t, b_gate, b_strides, b_gate_strides = _parts(b, c)
    r_t, r_gate, r_strides, r_gate_strides = _parts(residual, c)
    (M, K), N = a_t.shape, b_t.shape[1]
    k_per_split = triton.cdiv(K, splits)
    c_strides = c.stride() if c.dim() == 3 else (0, *c.stride())
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]), splits)  # noqa: E731
    args = (
        a_t, a_gate, b_t, b_gate, r_t, r_gate, c,
        M, N, K, k_per_split, _bucket(M), _bucket(N), _bucket(k_per_split),
        *a_strides, *a_gate_strides, *b_strides, *b_gate_strides, *r_strides, *r_gate_strides, *c_strides,
        float(alpha), float(threshold),
    )  # fmt: skip
    constexprs = {
        "A_GATED": isinstance(a, Gated),
        "B_GATED": isinstance(b, Gated),
        "HAS_RESIDUAL": residual is not None,
        "R_GATED": isinstance(residual, Gated),
        "RELU": relu,
        "DOT_DTYPE": _TL_DTYPES[dot_dtype],
        "UPCAST": interpreter_upcast(dot_dtype, (torch.float16, torch.bfloat16)),
        "DOT_PRECISION": dot_precision(a_t),
    }
    widest = max(a_t.element_size(), b_t.element_size())  # of the operand tiles in shared memory
    config = gemm_config(capability(c), widest, dot_dtype.itemsize, constexprs["DOT_PRECISION"])
    with on_device(c):
        launch(_ista_gemm_kernel, grid, args, constexprs, config)


def gemm_epilogue(
    a: Operand,
    b: Operand,
    *,
    alpha: float = 1.0,
    residual: Operand | None = None,
    threshold: float = 0.0,
    relu: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One token GEMM with its epilogue fused: ``relu?(alpha · a·b + residual − threshold)``, fp32 inside.

    Args:
        a: (M, K), or ``Gated`` (M, K) pair; any strides (a transposed view is read as is); b's dtype, or fp32 (its
            tiles are then rounded to b's dtype for the dot).
        b: (K, N), or ``Gated``: the dictionary side, whose dtype (fp32, fp16 or bf16) the product runs in.
        residual: (M, N) (or ``Gated``) added in fp32 before the threshold.
        out_dtype: of the result; b's dtype when None.

    Returns:
        (M, N) contiguous. No launch when empty.
    """
    a_t = a.tensor if isinstance(a, Gated) else a
    b_t = b.tensor if isinstance(b, Gated) else b
    c = a_t.new_empty(a_t.shape[0], b_t.shape[1], dtype=out_dtype or b_t.dtype)
    if c.numel():
        _launch(a, b, c, b_t.dtype, alpha=alpha, residual=residual, threshold=threshold, relu=relu)
    return c


def _num_splits(M: int, N: int, K: int, device: torch.device) -> int:
    """How many slices of the token reduction: enough programs to fill the device, each with a long K loop.

    On the GPU ~2 waves of 128 × 128 tiles with ≥ 512 tokens per slice; interpreting, at most 4 slices of ≥ 64 tokens
    (the interpreter pays per program, and tests still see several partial products reduced).
    """
    if device.type == "cuda":
        target, min_k = 2 * torch.cuda.get_device_properties(device).multi_processor_count, 512
        tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
    else:
        target, min_k, tiles = 4, 64, 1
    return max(1, min(triton.cdiv(K, min_k), triton.cdiv(target, tiles)))


def gemm_token_sum(products: list[tuple[torch.Tensor, Operand, float]], dot_dtype: torch.dtype) -> torch.Tensor:
    """``Σ alpha · aᵀ·b`` over all tokens, split-K with a deterministic reduction: the weight gradients.

    Each product is ``(a (T, M), b (T, N) or Gated, alpha)``; a is passed token-major and read transposed through
    its strides. The products run in ``dot_dtype`` (the dictionary's: activations in another dtype are rounded to
    it as they are loaded). Every product writes its slices of ONE fp32 buffer of partial products, summed once in a
    fixed order (no atomics, so two runs are bitwise equal).

    Returns:
        (M, N) fp32.
    """
    a0, b0, _ = products[0]
    T, M = a0.shape
    N = (b0.tensor if isinstance(b0, Gated) else b0).shape[1]
    splits = _num_splits(M, N, T, a0.device)
    partials = a0.new_empty(splits * len(products), M, N, dtype=torch.float32)
    if T == 0:
        return partials.new_zeros(M, N)
    for i, (a, b, alpha) in enumerate(products):
        _launch(a.t(), b, partials[i * splits : (i + 1) * splits], dot_dtype, splits=splits, alpha=alpha)
    return partials.sum(0)
