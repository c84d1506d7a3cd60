"""Square ISTA: ``relu(x + η(x D − x Dᵀ D) − ηλ)`` (paper eq. 15; upstream ``FeedForward``).

docs/design.md, 'ISTA forward' and 'ISTA backward'.

The identity this library is built on: the three upstream matmuls are ONE token GEMM with
``M = η(D − DᵀD)`` (D×D, built once per call): ``out = relu(x + x·M − ηλ)``. The identity stays out of M and x is
added in fp32, so that in low precision I + small does not lose the small part.
"""

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton

from crate_kernels import backend
from crate_kernels._checks import check_same, check_shape, check_tensor
from crate_kernels.kernels.ista import _ista_gemm_kernel

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_ista_args(x: torch.Tensor, weight: torch.Tensor) -> None:
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=2)
    if x.dim() < 1:
        raise ValueError(f"x must have a last dimension of width D, got shape {tuple(x.shape)}")
    D = x.shape[-1]
    check_shape("weight", weight, (D, D), "the square dictionary D for x of width D")
    check_same("weight", weight, "x", x)


def ista_dictionary_operator(weight: torch.Tensor, step_size: float) -> torch.Tensor:
    """``M = η(D − DᵀD)`` in fp32 (fp64 for fp64 weights): the (D, D) operator that turns ISTA into one GEMM."""
    D = weight.to(torch.promote_types(weight.dtype, torch.float32))
    return step_size * (D - D.t() @ D)


# ---------------------------------------------------------------------------------------------------------------
# The GEMM-with-epilogue launchers, shared with ops/ista_overcomplete.py.


class Gated(NamedTuple):
    """An operand read as ``where(gate <= 0, 0, tensor)``: a relu mask applied as the kernel loads the tile."""

    tensor: torch.Tensor  # (rows, cols), any strides
    gate: torch.Tensor  # (rows, cols), the saved activation whose relu mask applies


Operand = torch.Tensor | Gated


def _parts(
    t: Operand | None, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(tensor, gate, strides, gate strides); absent parts point at ``like`` with zero strides (never read)."""
    if t is None:
        return like, like, (0, 0), (0, 0)
    if isinstance(t, Gated):
        return t.tensor, t.gate, t.tensor.stride(), t.gate.stride()
    return t, t, t.stride(), (0, 0)


def _device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _bucket(n: int) -> int:
    """A size class for the autotune key: the next power of two, capped at 2¹⁶."""
    return min(triton.next_power_of_2(max(n, 1)), 1 << 16)


def _launch(
    a: Operand,
    b: Operand,
    c: torch.Tensor,
    *,
    splits: int = 1,
    alpha: float = 1.0,
    residual: Operand | None = None,
    threshold: float = 0.0,
    relu: bool = False,
) -> None:
    """``c = relu?(alpha · a·b + residual − threshold)``; c is (M, N), or (splits, M, N) partial products."""
    a_t, a_gate, a_strides, a_gate_strides = _parts(a, c)
    b_t, b_gate, b_strides, b_gate_strides = _parts(b, c)
    r_t, r_gate, r_strides, r_gate_strides = _parts(residual, c)
    (M, K), N = a_t.shape, b_t.shape[1]
    k_per_split = triton.cdiv(K, splits)
    c_strides = c.stride() if c.dim() == 3 else (0, *c.stride())
    tf32 = a_t.is_cuda and a_t.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]), splits)  # noqa: E731
    with _device(c):
        _ista_gemm_kernel[grid](
            a_t, a_gate, b_t, b_gate, r_t, r_gate, c,
            M, N, K, k_per_split, _bucket(M), _bucket(N), _bucket(k_per_split),
            *a_strides, *a_gate_strides, *b_strides, *b_gate_strides, *r_strides, *r_gate_strides, *c_strides,
            float(alpha), float(threshold),
            A_GATED=isinstance(a, Gated),
            B_GATED=isinstance(b, Gated),
            HAS_RESIDUAL=residual is not None,
            R_GATED=isinstance(residual, Gated),
            RELU=relu,
            # The interpreter has no bf16 arithmetic and multiplies fp16 slowly: compute on fp32 tiles.
            UPCAST=backend.interpreting() and a_t.dtype != torch.float32,
            DOT_PRECISION="tf32" if tf32 else "ieee",
        )  # fmt: skip


def gemm_epilogue(
    a: Operand,
    b: Operand,
    *,
    alpha: float = 1.0,
    residual: Operand | None = None,
    threshold: float = 0.0,
    relu: bool = False,
) -> torch.Tensor:
    """One token GEMM with its epilogue fused: ``relu?(alpha · a·b + residual − threshold)``, fp32 inside.

    Args:
        a: (M, K), or ``Gated`` (M, K) pair; any strides (a transposed view is read as is).
        b: (K, N), or ``Gated``, same dtype as a (fp32, fp16 or bf16).
        residual: (M, N) (or ``Gated``) added in fp32 before the threshold.

    Returns:
        (M, N) contiguous, a's dtype. No launch when empty.
    """
    a_t = a.tensor if isinstance(a, Gated) else a
    b_t = b.tensor if isinstance(b, Gated) else b
    c = a_t.new_empty(a_t.shape[0], b_t.shape[1])
    if c.numel():
        _launch(a, b, c, alpha=alpha, residual=residual, threshold=threshold, relu=relu)
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


def gemm_token_sum(products: list[tuple[torch.Tensor, Operand, float]]) -> torch.Tensor:
    """``Σ alpha · aᵀ·b`` over all tokens, split-K with a deterministic reduction: the weight gradients.

    Each product is ``(a (T, M), b (T, N) or Gated, alpha)``; a is passed token-major and read transposed through
    its strides. Every product writes its slices of ONE fp32 buffer of partial products, summed once in a fixed
    order (no atomics, so two runs are bitwise equal).

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
        _launch(a.t(), b, partials[i * splits : (i + 1) * splits], splits=splits, alpha=alpha)
    return partials.sum(0)


# ---------------------------------------------------------------------------------------------------------------
# Square ISTA: launchers, custom ops, PyTorch path, public function.


def _ista_kernel_limits(x: torch.Tensor, weight: torch.Tensor) -> list[str]:
    if x.dtype not in KERNEL_DTYPES:
        return [f"x has dtype {x.dtype}; the ISTA kernels take float32, float16 or bfloat16"]
    return []


backend.register_kernel_limits("ista", _ista_kernel_limits)


def _check_kernel_args(x: torch.Tensor, weight: torch.Tensor) -> None:
    _check_ista_args(x, weight)
    reasons = _ista_kernel_limits(x, weight)
    if reasons:
        raise ValueError("the ISTA Triton kernels cannot take these inputs: " + "; ".join(reasons))


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """(..., D) as (T, D): a view whenever the leading dims collapse to one stride (contiguous batches, any slice
    of the last dim, stride-0 broadcasts); otherwise (e.g. every other token of odd-length rows) reshape makes the
    one contiguous copy the two-stride kernels need."""
    return t.reshape(-1, t.shape[-1])


class IstaGrads(NamedTuple):
    dx: torch.Tensor  # (..., D), x's dtype
    dweight: torch.Tensor  # (D, D), weight's dtype


def ista_fwd(x: torch.Tensor, weight: torch.Tensor, step_size: float, lambd: float) -> torch.Tensor:
    """Forward: build M = η(D − DᵀD) (one cuBLAS call), then ONE fused GEMM ``relu(x·M + x − ηλ)``.

    Args:
        x: (..., D), any strides, fp32 / fp16 / bf16.
        weight: (D, D) dictionary, x's dtype.

    Returns:
        (..., D) contiguous, x's dtype: the output, which is also all the backward needs besides x and weight.
    """
    _check_kernel_args(x, weight)
    tokens = _tokens(x)
    M = ista_dictionary_operator(weight, step_size).to(x.dtype)
    return gemm_epilogue(tokens, M, residual=tokens, threshold=step_size * lambd, relu=True).view(x.shape)


def ista_bwd(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, step_size: float
) -> IstaGrads:
    """Backward, with g = dOut ∘ 1[out > 0] (out > 0 ⇔ pre-activation > 0) applied as the kernels load dOut.

    ``dx = g + g·Mᵀ`` (one GEMM, residual epilogue); ``C = xᵀ·g`` (split-K over all tokens, deterministic sum);
    ``dD = η(C − D(C + Cᵀ))`` because ``d tr(Cᵀ DᵀD) = D(C + Cᵀ)``: D³ work in fp32 with torch matmuls.
    M is rebuilt (D³, ~1% of the token work at CRATE sizes) rather than saved.

    Args:
        grad_out: (..., D), any strides (a stride-0 broadcast is read as is).
        x, weight, out: the forward's inputs and output.

    Returns:
        ``IstaGrads(dx (..., D), dweight (D, D))``.
    """
    _check_kernel_args(x, weight)
    tokens = _tokens(x)
    g = Gated(_tokens(grad_out), _tokens(out))
    M = ista_dictionary_operator(weight, step_size)
    dx = gemm_epilogue(g, M.to(x.dtype).t(), residual=g)
    C = gemm_token_sum([(tokens, g, 1.0)])
    W = weight.to(C.dtype)
    dweight = step_size * (C - W @ (C + C.t()))
    return IstaGrads(dx.view(x.shape), dweight.to(weight.dtype))


@torch.library.custom_op("crate_kernels::ista_fwd", mutates_args=())
def _ista_fwd_op(x: torch.Tensor, weight: torch.Tensor, step_size: float, lambd: float) -> torch.Tensor:
    return ista_fwd(x, weight, step_size, lambd)


@_ista_fwd_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, step_size: float, lambd: float) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("crate_kernels::ista_bwd", mutates_args=())
def _ista_bwd_op(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, step_size: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(ista_bwd(grad_out, x, weight, out, step_size))


@_ista_bwd_op.register_fake
def _(grad_out, x, weight, out, step_size):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _ista_setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, step_size, _ = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.step_size = step_size


def _ista_backward(ctx, grad_out: torch.Tensor) -> tuple:
    x, weight, out = ctx.saved_tensors
    dx, dweight = torch.ops.crate_kernels.ista_bwd(grad_out, x, weight, out, ctx.step_size)
    return dx, dweight, None, None


_ista_fwd_op.register_autograd(_ista_backward, setup_context=_ista_setup_context)


def _ista_torch(x: torch.Tensor, weight: torch.Tensor, step_size: float, lambd: float) -> torch.Tensor:
    """The PyTorch path: the M-form, one token GEMM; autograd gives dx = g + g·Mᵀ and dD through M."""
    M = ista_dictionary_operator(weight, step_size).to(x.dtype)
    tokens = x.reshape(-1, x.shape[-1])
    return F.relu(torch.addmm(tokens, tokens, M) - step_size * lambd).view(x.shape)


def ista(x: torch.Tensor, weight: torch.Tensor, *, step_size: float = 0.1, lambd: float = 0.1) -> torch.Tensor:
    """One ISTA step of CRATE on the square dictionary ``weight``.

    Args:
        x: (..., D) tokens, usually LN(z_half) of shape (B, N, D).
        weight: (D, D) dictionary in upstream layout (``FeedForward.weight``).
        step_size: η. lambd: λ, the sparsity threshold is ηλ.

    Returns:
        (..., D), non-negative and sparse. No residual (vanilla CRATE).

    Equivalent PyTorch::

        F.relu(x + step_size * (x @ weight - x @ weight.T @ weight) - step_size * lambd)
    """
    _check_ista_args(x, weight)
    if backend.use_triton("ista", x, weight):
        return _ista_fwd_op(x, weight, float(step_size), float(lambd))
    return _ista_torch(x, weight, float(step_size), float(lambd))
