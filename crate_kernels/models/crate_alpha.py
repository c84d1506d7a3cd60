"""CRATE-α (UCSC-VLAA/CRATE-alpha, torch_inference/model/crate_alpha.py): the scaled-up CRATE classifier.

Against vanilla CRATE: a strided-conv patch embedding with bias (``conv1``), attention without output bias, the
overcomplete decoupled ISTA block (``D``, ``D1`` of shape (D, 4D)) with a residual, LayerNorm eps 1e-6 in the layers,
then the head's LayerNorm on token 0. Keys equal upstream's: ``conv1.*``, ``pos_embedding``, ``cls_token``,
``transformer.layers.{i}.0.{norm.*, fn.qkv.weight, fn.to_out.0.weight}``, ``transformer.layers.{i}.1.{norm.*, fn.D,
fn.D1}``, ``mlp_head.{0,1}.*``.
"""

import torch
from torch import nn

from crate_kernels.models.crate import ClassifierHooks, Transformer, check_image_config, check_images, pair
from crate_kernels.modules import MSSA, OvercompleteISTA


class CRATEAlpha(ClassifierHooks, nn.Module):
    """CRATE-α classifier.

    Args:
        image_size, patch_size: int or (height, width). num_classes: head outputs.
        dim: D. depth: layers. heads: H. dim_head: P (presets use D // H).
        pool: ``"cls"`` (token 0, upstream) or ``"mean"``. channels: C of the images (upstream: 3).
        dropout: attention dropout. emb_dropout: on the embedded tokens (upstream builds it, never applies it; 0
            in every preset). ista: η. lambd: λ. overcomplete_ratio: m / D of the dictionaries.
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
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        ista: float = 0.1,
        lambd: float = 0.1,
        overcomplete_ratio: int = 4,
    ):
        super().__init__()
        grid_h, grid_w = check_image_config(image_size, patch_size)
        if pool not in {"cls", "mean"}:
            raise ValueError(f"pool must be 'cls' (class token) or 'mean' (mean pooling), got {pool!r}")
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(channels, dim, kernel_size=pair(patch_size), stride=pair(patch_size), bias=True)
        self.pos_embedding = nn.Parameter(torch.randn(1, grid_h * grid_w + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(
            dim,
            depth,
            lambda: (
                MSSA(dim, heads=heads, dim_head=dim_head, dropout=dropout, out_bias=False),
                OvercompleteISTA(dim, overcomplete_ratio, step_size=ista, lambd=lambd),
            ),
            eps=1e-6,
            ista_residual=True,
        )
        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, C, H, W) → tokens after the last layer (B, 1 + L, D), class token first."""
        check_images(images, self.channels, self.image_size)
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, D, h, w) → (B, h·w, D)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embedding
        return self.transformer(self.dropout(x))
