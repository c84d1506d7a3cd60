"""Overcomplete ISTA: two ISTA steps from zero on a (D, m) dictionary, then synthesis (DESIGN.md §1.3).

``a₁ = relu(η·xD − ηλ)``, ``a₂ = relu(a₁ + η(x − a₁Dᵀ)D − ηλ)``, ``out = a₂·D_outᵀ (+ residual)``.
CRATE-α decouples ``D_out = D1`` and adds the block input; crate-lm shares ``D_out = D`` with no residual.
Four thin GEMMs: ``xD`` is computed once and reused by step 2; DᵀD (m×m, m = 4D) is never formed.
"""

import torch
import torch.nn.functional as F

from crate_kernels._checks import check_same, check_shape, check_tensor


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


def _ista_overcomplete_torch(
    x: torch.Tensor,
    D: torch.Tensor,
    D_out: torch.Tensor,
    step_size: float,
    lambd: float,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """The PyTorch path: four GEMMs, xD reused, residual fused into the last one."""
    tokens = x.reshape(-1, x.shape[-1])
    xD = tokens @ D
    a1 = F.relu(step_size * xD - step_size * lambd)
    a2 = F.relu(a1 + step_size * (xD - (a1 @ D.t()) @ D) - step_size * lambd)
    if residual is None:
        return (a2 @ D_out.t()).view(x.shape)
    return torch.addmm(residual.reshape(-1, x.shape[-1]), a2, D_out.t()).view(x.shape)


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
    return _ista_overcomplete_torch(x, D, D_out, float(step_size), float(lambd), residual)
