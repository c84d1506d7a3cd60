"""MSSA as a drop-in ``nn.Module``: upstream ``Attention``'s constructor arguments and parameter names.

``qkv`` (Linear, no bias) → the per-head core ``crate_kernels.mssa`` on the (B, H, N, P) view → merge heads →
``to_out`` (Linear + Dropout, or Identity when one head spans the width). Paper eq. 11; docs/design.md, 'MSSA forward'.
"""

import torch
import torch.nn.functional as F
from torch import nn

from crate_kernels.backend import get_backend
from crate_kernels.ops.mssa import _sdpa_mask, mssa


class MSSA(nn.Module):
    """Multi-head subspace self-attention; ``state_dict`` keys equal upstream's (``qkv.weight``, ``to_out.0.*``).

    Args:
        dim: D, the token width.
        heads: H, the number of subspaces.
        dim_head: P, the width of each subspace.
        dropout: on the attention probabilities (training only) and after the output projection, as upstream.
        out_bias: bias of the output projection (CRATE-α has none).
        is_causal: token i attends to tokens j ≤ i (the CRATE language model).
        project_out: whether ``to_out`` holds a projection; None: upstream's rule, none when one head spans the
            width (crate-lm always projects).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        *,
        out_bias: bool = True,
        is_causal: bool = False,
        project_out: bool | None = None,
    ):
        super().__init__()
        inner_dim = dim_head * heads
        project_out = not (heads == 1 and dim_head == dim) if project_out is None else project_out
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.attn_dropout = dropout
        self.is_causal = is_causal
        self.qkv = nn.Linear(dim, inner_dim, bias=False)
        self.to_out = (
            nn.Sequential(nn.Linear(inner_dim, dim, bias=out_bias), nn.Dropout(dropout))
            if project_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D); attn_mask: SDPA semantics (see ``crate_kernels.mssa``). Returns (B, N, D)."""
        B, N, _ = x.shape
        w = self.qkv(x).view(B, N, self.heads, self.dim_head).transpose(1, 2)  # (B, H, N, P) view, no copy
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(w.dtype)  # an additive mask follows w into autocast's dtype
        if self.training and self.attn_dropout > 0:
            # The fused core has no attention dropout (every preset uses 0); SDPA serves this training-only case.
            mask = _sdpa_mask(attn_mask, N, self.is_causal, w.device)
            causal_only = self.is_causal and attn_mask is None
            o = F.scaled_dot_product_attention(
                w, w, w, attn_mask=mask, dropout_p=self.attn_dropout, is_causal=causal_only, scale=self.scale
            )
        else:
            o = mssa(w, scale=self.scale, attn_mask=attn_mask, is_causal=self.is_causal)
        return self.to_out(o.transpose(1, 2).reshape(B, N, self.heads * self.dim_head))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim_head={self.dim_head}, is_causal={self.is_causal}, backend={get_backend()!r}"
