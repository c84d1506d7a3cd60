"""Overcomplete ISTA: two ISTA steps from zero on a (D, m) dictionary, then synthesis.

docs/design.md, 'Overcomplete ISTA' and 'Overcomplete ISTA backward'.

``a₁ = relu(η·xD − ηλ)``, ``a₂ = relu(a₁ + η(x − a₁Dᵀ)D − ηλ)``, ``out = a₂·D_outᵀ (+ residual)``.
CRATE-α decouples ``D_out = D1`` and adds the block input; crate-lm shares ``D_out = D`` with no residual.
Four thin GEMMs: ``xD`` is computed once and reused by step 2; DᵀD (m×m, m = 4D) is never formed.

The kernels (``ops/gemm.py``) reuse xD in the exact form ``η·xD − η(a₁Dᵀ)D = η(x − a₁Dᵀ)D``: step 1's
GEMM emits a₁, the second GEMM emits ``r = x − a₁Dᵀ`` with x added in its epilogue, the third ``relu(a₁ + η·rD − ηλ)``.
Same four GEMMs, no (T, m) xD buffer written and re-read, and the rounding of upstream's ``(a₁Dᵀ − x)D``.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from crate_kernels import backend
from crate_kernels._checks import check_same, check_shape, check_tensor
from crate_kernels.ops.gemm import Gated, as_tokens, gemm_epilogue, gemm_token_sum
from crate_kernels.ops.launch import dtype_limits, require_kernel


def _check_ista_overcomplete_args(
    x: torch.Tensor, D: torch.Tensor, D_out: torch.Tensor | None, residual: torch.Tensor | None
) -> None:
    check_tensor("x", x)
    check_tensor("D", D, ndim=2)
    if x.dim() < 1 or D.shape[0] != x.shape[-1]:
        raise ValueError(
            f"D must have shape (D, m) with D = x.shape[-1], got D {tuple(D.shape)} for x {tuple(x.shape)}"
        )
    check_same("D", D, "x", x)
    if D_out is not None:
        check_tensor("D_out", D_out, ndim=2)
        check_shape("D_out", D_out, tuple(D.shape), "the synthesis dictionary, shaped like D")
        check_same("D_out", D_out, "x", x)
    if residual is not None:
        check_tensor("residual", residual)
        check_shape("residual", residual, tuple(x.shape), "added to the output, shaped like x")
        check_same("residual", residual, "x", x)


# The kernels' limits, declared to the backend that dispatches ``ista_overcomplete`` (and to ``require_kernel``).
backend.register_kernel_limits("ista_overcomplete", lambda x, D, D_out, residual: dtype_limits("x", x))


class IstaOvercompleteForward(NamedTuple):
    out: torch.Tensor  # (..., D) a₂·D_outᵀ (+ residual)
    r: torch.Tensor  # (..., D) x − a₁Dᵀ, saved for the backward
    a1: torch.Tensor  # (..., m) first ISTA step, saved for its relu mask and dD
    a2: torch.Tensor  # (..., m) second ISTA step, saved for its relu mask and dD_out


class IstaOvercompleteGrads(NamedTuple):
    dx: torch.Tensor  # (..., D)
    dD: torch.Tensor  # noqa: N815 (D, m), the paper's name
    dD_out: torch.Tensor  # noqa: N815 (D, m)


def ista_overcomplete_fwd(
    x: torch.Tensor,
    D: torch.Tensor,
    D_out: torch.Tensor,
    step_size: float,
    lambd: float,
    residual: torch.Tensor | None = None,
) -> IstaOvercompleteForward:
    """Forward: four fused GEMMs over the T tokens (threshold, relu and residual in their epilogues).

    ``a₁ = relu(η·xD − ηλ)``; ``r = x − a₁Dᵀ``; ``a₂ = relu(a₁ + η·rD − ηλ)``; ``out = a₂·D_outᵀ + residual``.

    Args:
        x: (..., D), any strides; fp32 / fp16 / bf16.
        D, D_out: (D, m), x's dtype, any strides (crate-lm's ``weight.T`` is read as is); may be the same tensor.
        residual: (..., D) or None.

    Returns:
        ``IstaOvercompleteForward(out, r, a1, a2)``, contiguous, x's dtype.
    """
    _check_ista_overcomplete_args(x, D, D_out, residual)
    require_kernel("ista_overcomplete", x, D, D_out, residual)
    tokens, threshold = as_tokens(x), step_size * lambd
    a1 = gemm_epilogue(tokens, D, alpha=step_size, threshold=threshold, relu=True)
    r = gemm_epilogue(a1, D.t(), alpha=-1.0, residual=tokens)
    a2 = gemm_epilogue(r, D, alpha=step_size, residual=a1, threshold=threshold, relu=True)
    out = gemm_epilogue(a2, D_out.t(), residual=None if residual is None else as_tokens(residual))
    m_shape = (*x.shape[:-1], D.shape[1])
    return IstaOvercompleteForward(out.view(x.shape), r.view(x.shape), a1.view(m_shape), a2.view(m_shape))


def ista_overcomplete_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    D: torch.Tensor,
    D_out: torch.Tensor,
    r: torch.Tensor,
    a1: torch.Tensor,
    a2: torch.Tensor,
    step_size: float,
) -> IstaOvercompleteGrads:
    """Backward of the chain, derived by hand; the relu masks come from the saved a₁, a₂ as the tiles are loaded.

    With dO = grad_out, g₂ = (dO·D_out) ∘ 1[a₂ > 0] and g₁ = (g₂ − dr·D) ∘ 1[a₁ > 0]::

        dr     = η·g₂Dᵀ                        (through a₂ = relu(a₁ + η·rD − ηλ))
        dx     = dr + η·g₁Dᵀ                   (r = x − a₁Dᵀ passes dr to x; a₁ = relu(η·xD − ηλ))
        dD     = η·rᵀg₂ − drᵀa₁ + η·xᵀg₁       (the three places D appears)
        dD_out = dOᵀa₂
        dresidual = dO                          (returned by the autograd formula, no kernel)

    Token GEMMs: dO·D_out, g₂Dᵀ, g₂ − dr·D (residual epilogue), g₁Dᵀ + dr (residual epilogue); dD and dD_out are
    split-K reductions over the tokens with deterministic sums. The ungated products dO·D_out and g₂ − dr·D are
    stored; their gates are applied by every consumer as it loads them.

    Args:
        grad_out: (..., D), any strides. x, D, D_out: the forward's inputs. r, a1, a2: its saved activations.

    Returns:
        ``IstaOvercompleteGrads(dx (..., D), dD (D, m), dD_out (D, m))`` in the inputs' dtypes.
    """
    _check_ista_overcomplete_args(x, D, D_out, None)
    require_kernel("ista_overcomplete", x, D, D_out, None)
    dO, tokens, r, a1, a2 = (as_tokens(t) for t in (grad_out, x, r, a1, a2))
    g2 = Gated(gemm_epilogue(dO, D_out), a2)
    dr = gemm_epilogue(g2, D.t(), alpha=step_size)
    g1 = Gated(gemm_epilogue(dr, D, alpha=-1.0, residual=g2), a1)
    dx = gemm_epilogue(g1, D.t(), alpha=step_size, residual=dr)
    dD = gemm_token_sum([(r, g2, step_size), (dr, a1, -1.0), (tokens, g1, step_size)])
    dD_out = gemm_token_sum([(dO, a2, 1.0)])
    return IstaOvercompleteGrads(dx.view(x.shape), dD.to(D.dtype), dD_out.to(D_out.dtype))


@torch.library.custom_op("crate_kernels::ista_overcomplete_fwd", mutates_args=())
def _ista_overcomplete_fwd_op(
    x: Tensor, D: Tensor, D_out: Tensor, residual: Tensor | None, step_size: float, lambd: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(ista_overcomplete_fwd(x, D, D_out, step_size, lambd, residual))


@_ista_overcomplete_fwd_op.register_fake
def _(x, D, D_out, residual, step_size, lambd):
    m_shape = (*x.shape[:-1], D.shape[1])
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(m_shape), x.new_empty(m_shape)


@torch.library.custom_op("crate_kernels::ista_overcomplete_bwd", mutates_args=())
def _ista_overcomplete_bwd_op(
    grad_out: Tensor, x: Tensor, D: Tensor, D_out: Tensor, r: Tensor, a1: Tensor, a2: Tensor, step_size: float
) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(ista_overcomplete_bwd(grad_out, x, D, D_out, r, a1, a2, step_size))


@_ista_overcomplete_bwd_op.register_fake
def _(grad_out, x, D, D_out, r, a1, a2, step_size):
    return x.new_empty(x.shape), D.new_empty(D.shape), D_out.new_empty(D_out.shape)


def _ista_overcomplete_setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, D, D_out, residual, step_size, _ = inputs
    _, r, a1, a2 = output
    ctx.mark_non_differentiable(r, a1, a2)
    ctx.save_for_backward(x, D, D_out, r, a1, a2)
    ctx.step_size, ctx.has_residual = step_size, residual is not None


def _ista_overcomplete_backward(ctx, grad_out: torch.Tensor, *_saved_activation_grads: None) -> tuple:
    dx, dD, dD_out = torch.ops.crate_kernels.ista_overcomplete_bwd(grad_out, *ctx.saved_tensors, ctx.step_size)
    return dx, dD, dD_out, grad_out if ctx.has_residual else None, None, None


_ista_overcomplete_fwd_op.register_autograd(_ista_overcomplete_backward, setup_context=_ista_overcomplete_setup_context)


def _ista_overcomplete_torch(
    x: torch.Tensor,
    D: torch.Tensor,
    D_out: torch.Tensor,
    step_size: float,
    lambd: float,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """The PyTorch path: four GEMMs, xD reused, residual fused into the last one."""
    tokens = as_tokens(x)
    xD = tokens @ D
    a1 = F.relu(step_size * xD - step_size * lambd)
    a2 = F.relu(a1 + step_size * (xD - (a1 @ D.t()) @ D) - step_size * lambd)
    if residual is None:
        return (a2 @ D_out.t()).view(x.shape)
    return torch.addmm(as_tokens(residual), a2, D_out.t()).view(x.shape)


def ista_overcomplete(
    x: torch.Tensor,
    D: torch.Tensor,
    D_out: torch.Tensor | None = None,
    *,
    step_size: float = 0.1,
    lambd: float = 0.1,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The overcomplete ISTA block of CRATE-α and the CRATE language model.

    Args:
        x: (..., D) tokens.
        D: (D, m) analysis dictionary (CRATE-α's ``D``; crate-lm's ``weight.T``).
        D_out: (D, m) synthesis dictionary (CRATE-α's ``D1``); ``D`` when None.
        step_size: η. lambd: λ.
        residual: (..., D) added to the output (CRATE-α: the block input ``z_half``).

    Returns:
        (..., D).

    Equivalent PyTorch::

        a1 = F.relu(step_size * x @ D - step_size * lambd)
        a2 = F.relu(a1 + step_size * (x - a1 @ D.T) @ D - step_size * lambd)
        out = a2 @ (D if D_out is None else D_out).T + (0 if residual is None else residual)
    """
    _check_ista_overcomplete_args(x, D, D_out, residual)
    D_out = D if D_out is None else D_out
    if backend.use_triton("ista_overcomplete", x, D, D_out, residual):
        # crate-lm's shared dictionary enters twice: autograd adds dD and dD_out into the one gradient.
        return _ista_overcomplete_fwd_op(x, D, D_out, residual, float(step_size), float(lambd))[0]
    return _ista_overcomplete_torch(x, D, D_out, float(step_size), float(lambd), residual)
