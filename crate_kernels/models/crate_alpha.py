"""CRATE-α (UCSC-VLAA/CRATE-alpha, torch_inference/model/crate_alpha.py): the scaled-up CRATE classifier.

Against vanilla CRATE: a strided-conv patch embedding with bias (``conv1``), attention without output bias, the
overcomplete decoupled ISTA block (``D``, ``D1`` of shape (D, 4D)) with a residual, LayerNorm eps 1e-6 in the layers,
then the head's LayerNorm on token 0. Keys equal upstream's: ``conv1.*``, ``pos_embedding``, ``cls_token``,
``transformer.layers.{i}.0.{norm.*, fn.qkv.weight, fn.to_out.0.weight}``, ``transformer.layers.{i}.1.{norm.*, fn.D,
fn.D1}``, ``mlp_head.{0,1}.*``.
"""

from functools import partial

import torch
from torch import nn

from crate_kernels.models.common import ImageClassifier, Transformer
from crate_kernels.modules import MSSA, OvercompleteISTA


class CRATEAlpha(ImageClassifier):
    """CRATE-α classifier.

    Args:
        image_size, patch_size: int or (height, width). num_classes: head outputs.
        dim: D. depth: layers. heads: H. dim_head: P (presets use D // H).
        channels: C of the images (upstream: 3).
        dropout: attention dropout. emb_dropout: on the embedded tokens (upstream builds it, never applies it; 0
            in every preset). pool: ``"cls"`` (token 0, upstream) or ``"mean"``. ista: η. lambd: λ.
        overcomplete_ratio: m / D of the dictionaries.
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
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        pool: str = "cls",
        ista: float = 0.1,
        lambd: float = 0.1,
        overcomplete_ratio: int = 4,
    ):
        def layer_pair() -> tuple[nn.Module, nn.Module]:
            return (
                MSSA(dim, heads=heads, dim_head=dim_head, dropout=dropout, out_bias=False),
                OvercompleteISTA(dim, overcomplete_ratio, step_size=ista, lambd=lambd),
            )

        layers = partial(Transformer, dim, depth, layer_pair, eps=1e-6, ista_residual=True)
        super().__init__(image_size, patch_size, channels, dim, emb_dropout, layers, pool, num_classes)

    def _build_patch_embedding(self, patch: tuple[int, int], channels: int, dim: int) -> None:
        self.conv1 = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch, bias=True)

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv1(images).flatten(2).transpose(1, 2)  # (B, D, h, w) → (B, h·w, D)
