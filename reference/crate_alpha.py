"""CRATE-α (upstream UCSC-VLAA/CRATE-alpha ``torch_inference/model/crate_alpha.py``): the PyTorch definition its .pth
checkpoints are evaluated with.

Differences from vanilla CRATE, all read from upstream: patch embedding is a strided ``Conv2d`` with bias (``conv1``);
attention has no output bias; the ISTA block is ``OvercompleteISTABlock`` (D, D1 of shape (D, 4D)) with a residual;
the pre-norms use LayerNorm eps 1e-6 (the head's LayerNorm keeps the default 1e-5); pooling is token 0 only;
``emb_dropout`` is built but upstream never applies it.
"""

import torch
from torch import nn

from reference.crate import pair
from reference.ista import OvercompleteISTABlock


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class Attention(nn.Module):
    """Upstream CRATE-α ``Attention``: as ``reference.mssa.Attention`` with a bias-free ``to_out.0``."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        project_out = not (heads == 1 and dim_head == dim)
        self.heads = heads
        self.scale = dim_head**-0.5
        self.attend = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)
        self.qkv = nn.Linear(dim, inner_dim, bias=False)
        self.to_out = (
            nn.Sequential(nn.Linear(inner_dim, dim, bias=False), nn.Dropout(dropout)) if project_out else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        w = self.qkv(x).view(B, N, self.heads, -1).transpose(1, 2)
        attn = self.dropout(self.attend(torch.matmul(w, w.transpose(-1, -2)) * self.scale))
        return self.to_out(torch.matmul(attn, w).transpose(1, 2).reshape(B, N, -1))


class Transformer(nn.Module):
    """``z_half = z + MSSA(LN(z))``; ``z_next = z_half + OvercompleteISTA(LN(z_half))``."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, dropout: float = 0.0):
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
                        PreNorm(dim, OvercompleteISTABlock(d=dim)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


class CRATE(nn.Module):
    """Upstream's class name is ``CRATE``; ``channels`` is ours (upstream hard-codes ``in_channels=3``)."""

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
    ):
        super().__init__()
        image_height, image_width = pair(image_size)
        patch_height, patch_width = pair(patch_size)
        if image_height % patch_height or image_width % patch_width:
            raise ValueError("Image dimensions must be divisible by the patch size.")
        num_patches = (image_height // patch_height) * (image_width // patch_width)
        self.conv1 = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size, bias=True, padding="valid")
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, dim_head, dropout)
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.conv1(img)  # (B, D, h, w)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, h·w, D)
        b, n, _ = x.shape
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x = x + self.pos_embedding[:, : (n + 1)]
        x = self.transformer(x)
        return self.mlp_head(self.to_latent(x[:, 0]))


def CRATE_base(num_classes: int = 1000) -> CRATE:
    return CRATE(image_size=224, patch_size=16, num_classes=num_classes, dim=768, depth=12, heads=12, dim_head=64)


def CRATE_large(num_classes: int = 1000) -> CRATE:
    return CRATE(image_size=224, patch_size=14, num_classes=num_classes, dim=1024, depth=24, heads=16, dim_head=64)
