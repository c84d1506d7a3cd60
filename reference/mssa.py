"""MSSA, multi-head subspace self-attention (paper eq. 11; upstream ``Attention`` in model/crate.py).

Per head, the one projection ``w = U_kᵀ LN(z)`` is query, key and value: ``softmax(scale · w wᵀ) w``.
"""

import torch
from torch import nn


def mssa_ref(
    w: torch.Tensor, scale: float | None = None, is_causal: bool = False, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The MSSA core, literally: scores, mask, softmax over keys, weighted sum.

    Args:
        w: (B, H, N, P) per-head projections.
        scale: multiplies w wᵀ; P^-½ when None.
        is_causal: query i attends to keys j ≤ i.
        attn_mask: SDPA semantics: bool broadcastable to (B, H, N, N), True = attend, or an additive float mask;
            a 2-D (B, N) bool mask with (B, N) != (N, N) is a key-padding mask.

    Returns:
        (B, H, N, P). Rows with every key masked are zero, as SDPA returns them.
    """
    _B, _H, N, P = w.shape
    scale = P**-0.5 if scale is None else scale
    scores = torch.matmul(w, w.transpose(-1, -2)) * scale
    allowed = torch.ones(N, N, dtype=torch.bool, device=w.device)
    if is_causal:
        allowed = allowed.tril()
    if attn_mask is not None:
        if attn_mask.dim() == 2 and attn_mask.shape != (N, N):
            attn_mask = attn_mask[:, None, None, :]
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    attn = torch.softmax(scores, dim=-1)
    attn = attn.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
    return torch.matmul(attn, w)


class Attention(nn.Module):
    """Upstream ``Attention``: qkv (no bias) → MSSA per head → merge heads → to_out (Linear + Dropout)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        project_out = not (heads == 1 and dim_head == dim)
        self.heads = heads
        self.scale = dim_head**-0.5
        self.attend = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)
        self.qkv = nn.Linear(dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout)) if project_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        w = self.qkv(x).view(B, N, self.heads, -1).transpose(1, 2)  # 'b n (h d) -> b h n d'
        dots = torch.matmul(w, w.transpose(-1, -2)) * self.scale
        attn = self.dropout(self.attend(dots))
        out = torch.matmul(attn, w).transpose(1, 2).reshape(B, N, -1)  # 'b h n d -> b n (h d)'
        return self.to_out(out)
