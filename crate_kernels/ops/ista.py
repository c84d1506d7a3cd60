"""Square ISTA: ``relu(x + η(x D − x Dᵀ D) − ηλ)`` (paper eq. 15; upstream ``FeedForward``).

docs/design.md, 'ISTA forward' and 'ISTA backward'.

The identity this library is built on: the three upstream matmuls are ONE token GEMM with
``M = η(D − DᵀD)`` (D×D, built once per call): ``out = relu(x + x·M − ηλ)``. The identity stays out of M and x is
added in fp32, so that in low precision I + small does not lose the small part.

Dtypes: the token GEMMs run in the dictionary's dtype, x keeps its own. Under autocast (``ops/autocast.py``) the
dictionary goes to the autocast dtype and a float32 x stays float32, so the output is float32 as upstream's
``relu(x + bf16 update)`` is; a bf16 x gives bf16.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from crate_kernels import backend
from crate_kernels._checks import check_dictionary, check_positive, check_shape, check_tensor
from crate_kernels.ops import autocast
from crate_kernels.ops.gemm import Gated, as_tokens, gemm_epilogue, gemm_token_sum
from crate_kernels.ops.launch import dtype_limits, require_kernel


def _check_ista_args(x: torch.Tensor, weight: torch.Tensor) -> None:
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=2)
    if x.dim() < 1:
        raise ValueError(f"x must have a last dimension of width D, got shape {tuple(x.shape)}")
    D = x.shape[-1]
    check_positive("x's width D", D, x, "its last dimension")
    check_shape("weight", weight, (D, D), "the square dictionary D for x of width D")
    check_dictionary("weight", weight, x)


def _ista_autocast(args: tuple, dtype: torch.dtype) -> tuple:
    """The ISTA autocast rule on ``(x, weight, ...)``: the dictionary to ``dtype``, a float32 x kept."""
    x, weight, *rest = args
    return (autocast.gemm_activation(x, dtype), autocast.cast(weight, dtype), *rest)


def ista_dictionary_operator(weight: torch.Tensor, step_size: float) -> torch.Tensor:
    """``M = η(D − DᵀD)`` in fp32 (fp64 for fp64 weights): the (D, D) operator that turns ISTA into one GEMM."""
    D = weight.to(torch.promote_types(weight.dtype, torch.float32))
    return step_size * (D - D.t() @ D)


def ista_dictionary_grad(C: torch.Tensor, weight: torch.Tensor, step_size: float) -> torch.Tensor:
    """dD from ``C = xᵀ·g`` (the gradient of M): ``η(C − D(C + Cᵀ))``, as ``d tr(Cᵀ DᵀD) = D(C + Cᵀ)``. D³ work in
    C's precision (fp32: an fp16 dD that fits overflows nowhere on the way), returned in weight's dtype."""
    D = weight.to(C.dtype)
    return (step_size * (C - D @ (C + C.t()))).to(weight.dtype)


# The kernels' limits, declared to the backend that dispatches ``ista`` (and to ``require_kernel``).
backend.register_kernel_limits("ista", lambda x, weight: dtype_limits("x", x))


class IstaGrads(NamedTuple):
    dx: torch.Tensor  # (..., D), x's dtype
    dweight: torch.Tensor  # (D, D), weight's dtype


def ista_fwd(x: torch.Tensor, weight: torch.Tensor, step_size: float, lambd: float) -> torch.Tensor:
    """Forward: build M = η(D − DᵀD) (one cuBLAS call), then ONE fused GEMM ``relu(x·M + x − ηλ)``.

    Args:
        x: (..., D), any strides, fp32 / fp16 / bf16.
        weight: (D, D) dictionary, x's dtype or, for an fp32 x, fp16 / bf16 (the GEMM then runs in it).

    Returns:
        (..., D) contiguous, x's dtype: the output, which is also all the backward needs besides x and weight.
    """
    _check_ista_args(x, weight)
    require_kernel("ista", x, weight)
    tokens = as_tokens(x)
    M = ista_dictionary_operator(weight, step_size).to(weight.dtype)
    out = gemm_epilogue(tokens, M, residual=tokens, threshold=step_size * lambd, relu=True, out_dtype=x.dtype)
    return out.view(x.shape)


def ista_bwd(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, step_size: float
) -> IstaGrads:
    """Backward, with g = dOut ∘ 1[out > 0] (out > 0 ⇔ pre-activation > 0) applied as the kernels load dOut.

    ``dx = g + g·Mᵀ`` (one GEMM, residual epilogue, x's dtype); ``C = xᵀ·g`` (split-K over all tokens in weight's
    dtype, fp32 sum, deterministic); dD by ``ista_dictionary_grad``. M is rebuilt (D³, ~1% of the token work at
    CRATE sizes) rather than saved.

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
    M = ista_dictionary_operator(weight, step_size).to(weight.dtype)
    dx = gemm_epilogue(g, M.t(), residual=g, out_dtype=x.dtype)
    C = gemm_token_sum([(tokens, g, 1.0)], weight.dtype)
    return IstaGrads(dx.view(x.shape), ista_dictionary_grad(C, weight, step_size))


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
autocast.register("ista_fwd", _ista_fwd_op, _ista_autocast)


class _IstaTorch(torch.autograd.Function):
    """The PyTorch path: the M-form forward (one token GEMM in weight's dtype, x added in its own) and the kernels'
    backward, whose ``C = xᵀ·g`` is summed in fp32 (fp64 for fp64): autograd through M would form it in fp16 and
    overflow where the true dD fits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, step_size: float, lambd: float) -> torch.Tensor:
        M = ista_dictionary_operator(weight, step_size).to(weight.dtype)
        tokens = as_tokens(x)
        out = F.relu(tokens + tokens.to(M.dtype) @ M - step_size * lambd).view(x.shape)
        ctx.save_for_backward(x, weight, out)
        ctx.step_size = step_size
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple:
        x, weight, out = ctx.saved_tensors
        M = ista_dictionary_operator(weight, ctx.step_size).to(weight.dtype)
        g = as_tokens(torch.where(out <= 0, 0.0, grad_out))  # torch.relu's backward, NaN passing through
        dx = (g + g.to(M.dtype) @ M.t()).to(x.dtype).view(x.shape)
        wide = torch.promote_types(weight.dtype, torch.float32)
        C = as_tokens(x).to(weight.dtype).to(wide).t() @ g.to(weight.dtype).to(wide)  # the kernels' rounding
        return dx, ista_dictionary_grad(C, weight, ctx.step_size), None, None


def ista(x: torch.Tensor, weight: torch.Tensor, *, step_size: float = 0.1, lambd: float = 0.1) -> torch.Tensor:
    """One ISTA step of CRATE on the square dictionary ``weight``.

    Args:
        x: (..., D) tokens, usually LN(z_half) of shape (B, N, D).
        weight: (D, D) dictionary in upstream layout (``FeedForward.weight``).
        step_size: η. lambd: λ, the sparsity threshold is ηλ.

    Returns:
        (..., D), non-negative and sparse, x's dtype. No residual (vanilla CRATE).

    ``weight`` may be fp16 / bf16 for an fp32 x: the token GEMM runs in it, x is added in fp32 and the output is fp32.
    Under autocast the dictionary goes to the autocast dtype that way and a float32 x stays float32, as upstream's
    ``relu(x + bf16 update)``. ±Inf in a token of x: upstream's three products make its whole row NaN (the Inf
    meets both signs inside (x Dᵀ) D), the M-form gives a mix of ±Inf, 0 and NaN there (M folds the products); NaN
    propagates alike, and finite inputs agree.

    Equivalent PyTorch::

        F.relu(x + step_size * (x @ weight - x @ weight.T @ weight) - step_size * lambd)
    """
    x, weight = autocast.apply(_ista_autocast, (x, weight), x)
    _check_ista_args(x, weight)
    with autocast.disabled(x):
        if backend.use_triton("ista", x, weight):
            return _ista_fwd_op(x, weight, float(step_size), float(lambd))
        return _IstaTorch.apply(x, weight, float(step_size), float(lambd))
