"""Square ISTA: ``relu(x + η(x D − x Dᵀ D) − ηλ)`` (paper eq. 15; upstream ``FeedForward``).

docs/design.md, 'ISTA forward' and 'ISTA backward'.

The identity this library is built on: the three upstream matmuls are ONE token GEMM with
``M = η(D − DᵀD)`` (D×D, built once per call): ``out = relu(x + x·M − ηλ)``. The identity stays out of M and x is
added in fp32, so that in low precision I + small does not lose the small part.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from crate_kernels import backend
from crate_kernels._checks import check_same, check_shape, check_tensor
from crate_kernels.ops.gemm import Gated, as_tokens, gemm_epilogue, gemm_token_sum
from crate_kernels.ops.launch import dtype_limits, require_kernel


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


# The kernels' limits, declared to the backend that dispatches ``ista`` (and to ``require_kernel``).
backend.register_kernel_limits("ista", lambda x, weight: dtype_limits("x", x))


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
    _check_ista_args(x, weight)
    require_kernel("ista", x, weight)
    tokens = as_tokens(x)
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
    _check_ista_args(x, weight)
    require_kernel("ista", x, weight)
    tokens = as_tokens(x)
    g = Gated(as_tokens(grad_out), as_tokens(out))
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
    tokens = as_tokens(x)
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
