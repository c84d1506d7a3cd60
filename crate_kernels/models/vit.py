"""The black-box baseline: a standard pre-norm ViT of CRATE's size, for comparisons inside this package.

Each layer is ``z ← z + proj(SDPA(q(LN₁ z), k(LN₁ z), v(LN₁ z)))`` then ``z ← z + fc2(GELU(fc1(LN₂ z)))`` with MLP
ratio 4 (Dosovitskiy et al. 2021; timm's ``Block``, separate q, k, v). Everything else is CRATE's classifier: the
same patch embedding, class token, learned positions, pooling and head (``ImageClassifier``), so the layer equation
is the only difference between ``crate_*`` and ``vit_*`` of one size (docs/design.md, "ViT baseline").
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from crate_kernels.models.common import ImageClassifier, Transformer
from crate_kernels.models.crate import CRATE


class Attention(nn.Module):
    """Multi-head softmax attention with separate q, k, v projections (bias) and an output projection.

    Args: dim: D. heads: H. dim_head: P. dropout: on the attention probabilities (training) and after ``proj``.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dim_head, self.scale, self.attn_dropout = heads, dim_head, dim_head**-0.5, dropout
        self.q, self.k, self.v = (nn.Linear(dim, heads * dim_head) for _ in range(3))
        self.proj = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(dropout))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, H·P) → (B, H, N, P)."""
        return t.view(*t.shape[:2], self.heads, self.dim_head).transpose(1, 2)

    def queries_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, D) normalised tokens → queries and keys, each (B, H, N, P)."""
        return self._split(self.q(x)), self._split(self.k(x))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D) → (B, N, D); attn_mask: SDPA semantics."""
        B, N, _ = x.shape
        q, k = self.queries_keys(x)
        p = self.attn_dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, self._split(self.v(x)), attn_mask=attn_mask, dropout_p=p)
        return self.proj(o.transpose(1, 2).reshape(B, N, self.heads * self.dim_head))


class ViTTransformer(Transformer):
    """``depth`` pre-norm ViT layers: ``layers[i] = [PreNorm(Attention), PreNorm(MLP)]``, both residual."""

    def _layer(self, attn: nn.Module, ff: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + attn(x, attn_mask=attn_mask)
        return x + ff(x)


def mlp(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
    )


class ViT(ImageClassifier):
    """A pre-norm ViT classifier with CRATE's constructor, embedding and head.

    Args:
        image_size, patch_size: int or (height, width). num_classes: head outputs.
        dim: D. depth: layers. heads: H. dim_head: P (presets use D // H). mlp_ratio: MLP hidden width / D.
        pool: ``"cls"`` or ``"mean"``. channels: C of the images. dropout: attention and MLP dropout.
        emb_dropout: on the embedded tokens.
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        pool: str = "cls",
        channels: int = 3,
        dim_head: int = 64,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
    ):
        pair = lambda: (Attention(dim, heads, dim_head, dropout), mlp(dim, mlp_ratio * dim, dropout))  # noqa: E731
        layers = partial(ViTTransformer, dim, depth, pair, eps=1e-6)
        super().__init__(image_size, patch_size, channels, dim, emb_dropout, layers, pool, num_classes)

    _build_patch_embedding = CRATE._build_patch_embedding
    embed_patches = CRATE.embed_patches
