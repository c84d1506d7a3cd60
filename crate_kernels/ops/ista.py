"""Square ISTA: ``relu(x + η(x D − x Dᵀ D) − ηλ)`` (paper eq. 15; upstream ``FeedForward``; DESIGN.md §1.2).

The identity this library is built on: the three upstream matmuls are ONE token GEMM with
``M = η(D − DᵀD)`` (D×D, built once per call): ``out = relu(x + x·M − ηλ)``. The identity stays out of M and x is
added in fp32, so that in low precision I + small does not lose the small part.
"""

import torch
import torch.nn.functional as F

from crate_kernels._checks import check_same, check_shape, check_tensor


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
    return _ista_torch(x, weight, float(step_size), float(lambd))
