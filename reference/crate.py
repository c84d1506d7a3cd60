"""The CRATE classifier (upstream model/crate.py): patch embedding, L layers of MSSA + ISTA, class-token head.

Attribute names give exactly the upstream state_dict keys (docs/design.md, 'The model family').
"""

import torch
from torch import nn

from reference.ista import FeedForward
from reference.mssa import Attention


def pair(t: int | tuple[int, int]) -> tuple[int, int]:
    return t if isinstance(t, tuple) else (t, t)


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class Transformer(nn.Module):
    """``z_half = z + MSSA(LN(z))``; ``z_next = ISTA(LN(z_half))`` (no residual)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, dropout: float = 0.0, ista: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList([])
        self.heads = heads
        self.depth = depth
        self.dim = dim
        for _ in range(depth):
            self.layers.append(
                nn.ModuleList(
                    [
                        PreNorm(dim, Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout)),
                        PreNorm(dim, FeedForward(dim, dim, dropout=dropout, step_size=ista)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            grad_x = attn(x) + x
            x = ff(grad_x)
        return x


class Patchify(nn.Module):
    """einops ``'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'``: no parameters, so it holds index 0 of the embedding."""

    def __init__(self, patch_height: int, patch_width: int):
        super().__init__()
        self.p1, self.p2 = patch_height, patch_width

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        B, C, Hi, Wi = img.shape
        x = img.reshape(B, C, Hi // self.p1, self.p1, Wi // self.p2, self.p2)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (Hi // self.p1) * (Wi // self.p2), self.p1 * self.p2 * C)


class CRATE(nn.Module):
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
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        ista: float = 0.1,
    ):
        super().__init__()
        image_height, image_width = pair(image_size)
        patch_height, patch_width = pair(patch_size)
        if image_height % patch_height or image_width % patch_width:
            raise ValueError("Image dimensions must be divisible by the patch size.")
        if pool not in {"cls", "mean"}:
            raise ValueError("pool type must be either cls (cls token) or mean (mean pooling)")
        num_patches = (image_height // patch_height) * (image_width // patch_width)
        patch_dim = channels * patch_height * patch_width
        self.to_patch_embedding = nn.Sequential(
            Patchify(patch_height, patch_width),
            nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, dim),
            nn.LayerNorm(dim),
        )
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, dim_head, dropout, ista=ista)
        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.to_patch_embedding(img)
        b, n, _ = x.shape
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x = x + self.pos_embedding[:, : (n + 1)]
        x = self.dropout(x)
        x = self.transformer(x)
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(self.to_latent(x))


def CRATE_tiny(num_classes: int = 1000) -> CRATE:
    return CRATE(image_size=224, patch_size=16, num_classes=num_classes, dim=384, depth=12, heads=6, dim_head=384 // 6)


def CRATE_small(num_classes: int = 1000) -> CRATE:
    return CRATE(
        image_size=224, patch_size=16, num_classes=num_classes, dim=576, depth=12, heads=12, dim_head=576 // 12
    )


def CRATE_base(num_classes: int = 1000) -> CRATE:
    return CRATE(
        image_size=224, patch_size=16, num_classes=num_classes, dim=768, depth=12, heads=12, dim_head=768 // 12
    )


def CRATE_large(num_classes: int = 1000) -> CRATE:
    return CRATE(
        image_size=224, patch_size=16, num_classes=num_classes, dim=1024, depth=24, heads=16, dim_head=1024 // 16
    )
