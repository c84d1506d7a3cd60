"""ISTA, the sparsification step (paper eq. 15; upstream ``FeedForward`` in model/crate.py), and the
overcomplete two-step ISTA of CRATE-α (``OvercompleteISTABlock``) and crate-lm.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init


def ista_ref(x: torch.Tensor, weight: torch.Tensor, step_size: float = 0.1, lambd: float = 0.1) -> torch.Tensor:
    """One proximal-gradient step on the dictionary D = ``weight``, with upstream's three matmuls.

    ``relu(x + η(x D − (x Dᵀ) D) − ηλ)``; no residual.

    Args:
        x: (..., D) tokens.
        weight: (D, D) dictionary, upstream layout.
    """
    x_dt = F.linear(x, weight)  # x Dᵀ
    grad_1 = F.linear(x_dt, weight.t())  # x Dᵀ D
    grad_2 = F.linear(x, weight.t())  # x D
    grad_update = step_size * (grad_2 - grad_1) - step_size * lambd
    return F.relu(x + grad_update)


def ista_overcomplete_ref(
    x: torch.Tensor,
    D: torch.Tensor,
    D_out: torch.Tensor | None = None,
    step_size: float = 0.1,
    lambd: float = 0.1,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Two ISTA steps from zero on an overcomplete dictionary, then synthesis (docs/design.md, 'Overcomplete ISTA').

    ``a₁ = relu(η x D − ηλ)``, ``a₂ = relu(a₁ − η (a₁ Dᵀ − x) D − ηλ)``, ``out = a₂ D_outᵀ (+ residual)``.

    Args:
        x: (..., D) tokens.
        D: (D, m) dictionary (m = 4·D in CRATE-α and crate-lm).
        D_out: (D, m) synthesis dictionary; D when None (crate-lm), ``D1`` in CRATE-α.
        residual: (..., D) added to the output (CRATE-α adds the block input).
    """
    D_out = D if D_out is None else D_out
    negative_lasso_grad = torch.einsum("pd,...p->...d", D, x)  # x D
    z1 = F.relu(step_size * negative_lasso_grad - step_size * lambd)
    Dz1 = torch.einsum("dp,...p->...d", D, z1)  # a₁ Dᵀ
    lasso_grad = torch.einsum("pd,...p->...d", D, Dz1 - x)
    z2 = F.relu(z1 - step_size * lasso_grad - step_size * lambd)
    out = torch.einsum("dp,...p->...d", D_out, z2)  # a₂ D_outᵀ
    return out if residual is None else out + residual


class FeedForward(nn.Module):
    """Upstream ``FeedForward``: the ISTA block with a (dim, dim) dictionary ``weight``."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, step_size: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        with torch.no_grad():
            init.kaiming_uniform_(self.weight)
        self.step_size = step_size
        self.lambd = 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ista_ref(x, self.weight, self.step_size, self.lambd)


class OvercompleteISTABlock(nn.Module):
    """CRATE-α's ISTA block: dictionaries ``D`` and ``D1`` of shape (dim, 4·dim)."""

    def __init__(self, d: int, overcomplete_ratio: int = 4, eta: float = 0.1, lmbda: float = 0.1):
        super().__init__()
        self.eta = eta
        self.lmbda = lmbda
        self.D = nn.Parameter(torch.empty(d, overcomplete_ratio * d))
        self.D1 = nn.Parameter(torch.empty(d, overcomplete_ratio * d))
        with torch.no_grad():
            init.kaiming_uniform_(self.D)
            init.kaiming_uniform_(self.D1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ista_overcomplete_ref(x, self.D, self.D1, self.eta, self.lmbda)
