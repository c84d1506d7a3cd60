"""ISTA blocks as drop-in ``nn.Module``s with upstream parameter names.

The math: docs/design.md, 'ISTA forward' and 'Overcomplete ISTA'.

``ISTA`` is upstream ``FeedForward`` (vanilla CRATE, CRATE-MAE encoder): one (D, D) dictionary ``weight``.
``OvercompleteISTA`` is CRATE-α's ``OvercompleteISTABlock`` (``D``, ``D1`` of shape (D, 4D)) or, with ``shared=True``,
crate-lm's ISTA block (one ``weight`` of shape (4D, D) = Dᵀ).
"""

import torch
from torch import nn
from torch.nn import init

from crate_kernels.backend import get_backend
from crate_kernels.ops.ista import ista
from crate_kernels.ops.ista_overcomplete import ista_overcomplete


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """Autocast's dtype on x's device inside an autocast region, else None. Autocast does not reach the custom ops,
    so the modules cast for them, as upstream's F.linear / einsum would be cast."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _cast(dtype: torch.dtype | None, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    return tensors if dtype is None else tuple(None if t is None else t.to(dtype) for t in tensors)


def _kaiming_parameter(*shape: int) -> nn.Parameter:
    """Upstream's init: ``kaiming_uniform_`` (a = 0), U(±√(6 / shape[1]))."""
    weight = torch.empty(*shape)
    init.kaiming_uniform_(weight)
    return nn.Parameter(weight)


class ISTA(nn.Module):
    """One ISTA step on a square dictionary: ``relu(x + η(x D − x Dᵀ D) − ηλ)``, no residual.

    Args:
        dim: D. hidden_dim, dropout: accepted for upstream's signature; upstream ignores them too.
        step_size: η (upstream's ``ista`` model argument). lambd: λ (0.1 upstream; 0.5 in the CRATE-MAE encoder).
    """

    def __init__(
        self, dim: int, hidden_dim: int | None = None, dropout: float = 0.0, step_size: float = 0.1, lambd: float = 0.1
    ):
        super().__init__()
        self.weight = _kaiming_parameter(dim, dim)
        self.step_size = step_size
        self.lambd = lambd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) → (..., D), non-negative; in autocast's dtype inside an autocast region."""
        x, weight = _cast(_autocast_dtype(x), x, self.weight)
        return ista(x, weight, step_size=self.step_size, lambd=self.lambd)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[0]}, step_size={self.step_size}, lambd={self.lambd}, backend={get_backend()!r}"


class OvercompleteISTA(nn.Module):
    """Two ISTA steps from zero on a (D, m) dictionary, m = ``overcomplete_ratio``·D, then synthesis.

    ``a₁ = relu(η·xD − ηλ)``, ``a₂ = relu(a₁ + η(x − a₁Dᵀ)D − ηλ)``, output ``a₂·D_outᵀ``.

    Args:
        dim: D. overcomplete_ratio: m / D. step_size: η. lambd: λ.
        shared: False: CRATE-α, parameters ``D`` and ``D1`` (D_out) both (D, m). True: crate-lm, one parameter
            ``weight`` of shape (m, D) holding Dᵀ, used for analysis and synthesis.
    """

    def __init__(
        self, dim: int, overcomplete_ratio: int = 4, step_size: float = 0.1, lambd: float = 0.1, shared: bool = False
    ):
        super().__init__()
        self.step_size = step_size
        self.lambd = lambd
        self.shared = shared
        if shared:
            self.weight = _kaiming_parameter(overcomplete_ratio * dim, dim)
        else:
            self.D = _kaiming_parameter(dim, overcomplete_ratio * dim)
            self.D1 = _kaiming_parameter(dim, overcomplete_ratio * dim)

    def dictionaries(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(D, D_out): each (D, m); D_out is None when shared (the op then synthesises with D)."""
        if self.shared:
            return self.weight.t(), None  # a transposed view: the op reads strides, nothing is copied
        return self.D, self.D1

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., D); residual: (..., D) added to the output (CRATE-α passes the block input). Returns (..., D).

        Inside an autocast region the code runs in autocast's dtype and the residual is added outside the op, so the
        residual stream keeps its precision (as upstream's ``ff(x) + x``).
        """
        dtype = _autocast_dtype(x)
        x, D, D_out = _cast(dtype, x, *self.dictionaries())
        if dtype is not None and residual is not None:
            return residual + ista_overcomplete(x, D, D_out, step_size=self.step_size, lambd=self.lambd)
        return ista_overcomplete(x, D, D_out, step_size=self.step_size, lambd=self.lambd, residual=residual)

    def extra_repr(self) -> str:
        D, _ = self.dictionaries()
        return (
            f"dim={D.shape[0]}, m={D.shape[1]}, shared={self.shared}, step_size={self.step_size}, "
            f"lambd={self.lambd}, backend={get_backend()!r}"
        )
