"""The CRATE classifier (upstream ``model/crate.py``).

Keys equal upstream's: ``to_patch_embedding.{1,2,3}``, ``pos_embedding``, ``cls_token``,
``transformer.layers.{i}.{0,1}.{norm,fn}``, ``mlp_head.{0,1}``.
"""

from functools import partial

import torch
from torch import nn

from crate_kernels.models.common import ImageClassifier, Patchify, crate_transformer


class CRATE(ImageClassifier):
    """The vanilla CRATE classifier, upstream's constructor and keys.

    Args:
        image_size, patch_size: int or (height, width). num_classes: head outputs.
        dim: D. depth: layers. heads: H. dim_head: P (presets use D // H).
        pool: ``"cls"`` (token 0) or ``"mean"``. channels: C of the images.
        dropout: attention dropout. emb_dropout: on the embedded tokens. ista: the ISTA step size η (λ = 0.1).
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
    ):
        layers = partial(crate_transformer, dim, depth, heads, dim_head, dropout, ista=ista)
        super().__init__(image_size, patch_size, channels, dim, emb_dropout, layers, pool, num_classes)

    def _build_patch_embedding(self, patch: tuple[int, int], channels: int, dim: int) -> None:
        patch_dim = channels * patch[0] * patch[1]
        self.to_patch_embedding = nn.Sequential(
            Patchify(*patch), nn.LayerNorm(patch_dim), nn.Linear(patch_dim, dim), nn.LayerNorm(dim)
        )

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        return self.to_patch_embedding(images)
