"""CRATE-MAE (Ma-Lab-Berkeley/CRATE ``model/crate_ae``): the white-box masked autoencoder.

Encoder: vanilla CRATE layers with λ = 0.5. Decoder: each layer inverts one encoder layer,
``y_half = LN(y)·Dᵀ`` (linear synthesis), then ``y_next = y_half − MSSA(LN(y_half))``. As upstream, the mask tokens
join the sequence BEFORE the encoder (with the fixed 2-D sin-cos ``decoder_pos_embed``), and the loss is the MSE on
the masked patches. Upstream builds ``pos_embed`` and ``decoder_embed`` without using them; they are kept (frozen) so
checkpoints load strictly.

Layout: upstream keeps each layer in its own block (``blocks.{i}.layers.0.*``, ``decoder_blocks.{i}.layers.0.*``);
here the layers follow the family's layout (``transformer.layers.{i}.*``, ``decoder.layers.{i}.*``), every other key
is upstream's. ``from_upstream_state_dict`` / ``to_upstream_state_dict`` convert between the two.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init

from crate_kernels.models.common import (
    ClassifierHooks,
    KeyLayout,
    Patchify,
    PreNorm,
    Transformer,
    check_image_config,
    check_images,
    check_pool,
    crate_transformer,
    pair,
)
from crate_kernels.modules import MSSA

UPSTREAM_KEYS = KeyLayout(
    [
        ("transformer.layers.{i}.", "blocks.{i}.layers.0."),
        ("decoder.layers.{i}.", "decoder_blocks.{i}.layers.0."),
    ]
)
from_upstream_state_dict = UPSTREAM_KEYS.to_ours  # upstream CRATE-MAE keys (blocks.{i}.layers.0.*) → CRATEMAE keys
to_upstream_state_dict = UPSTREAM_KEYS.to_upstream


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(1 + grid_h·grid_w, dim) fixed position embedding, a zero row for the class token first (MAE's).

    The first dim/2 channels encode the column, the last dim/2 the row, each as [sin(pos·ω), cos(pos·ω)] with
    ω_i = 10000^(−i / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4 for the 2-D sin-cos position embedding, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    angles = [pos.reshape(-1, 1) * omega for pos in (cols, rows)]
    emb = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb]).float()


class PatchEmbed(nn.Module):
    """timm's ``PatchEmbed`` (key ``proj.*``): strided conv, (B, C, H, W) → (B, L, D)."""

    def __init__(self, patch_size: int | tuple[int, int], channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=pair(patch_size), stride=pair(patch_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class DecoderTransformer(Transformer):
    """The CRATE-MAE decoder; ``layers[i] = [PreNorm(synthesis D), PreNorm(MSSA)]`` as upstream.

    ``y_half = LN₁(y)·Dᵀ``; ``y_next = y_half − MSSA(LN₂(y_half))``.
    """

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__(
            dim, depth, lambda: (self._synthesis(dim), MSSA(dim, heads=heads, dim_head=dim_head, dropout=dropout))
        )

    @staticmethod
    def _synthesis(dim: int) -> nn.Linear:
        synthesis = nn.Linear(dim, dim, bias=False)  # F.linear(x, D) = x Dᵀ; key ``weight`` as upstream
        init.kaiming_uniform_(synthesis.weight)  # upstream's init (a = 0), not nn.Linear's
        return synthesis

    def _layer(self, ff: PreNorm, attn: PreNorm, y: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        y_half = ff(y)
        return y_half - attn(y_half, attn_mask=attn_mask)


class CRATEMAE(ClassifierHooks, nn.Module):
    """CRATE masked autoencoder.

    Args:
        image_size, patch_size: int or (height, width). channels: C.
        dim: D (encoder and decoder width, equal upstream). depth: encoder layers. heads: H. dim_head: P.
        decoder_depth: decoder layers (``depth`` when None, as every upstream preset).
        norm_pix_loss: the loss compares per-patch normalised pixels.
        dropout: attention dropout. emb_dropout: on the embedded tokens. ista: η. lambd: λ of the encoder (0.5).
        num_classes: > 0 adds ``mlp_head`` (LN, Linear) for fine-tuning on ``forward_features``; 0 (default) keeps
            upstream's keys exactly. pool: ``"cls"`` or ``"mean"`` for ``forward_head``.
    """

    NO_WEIGHT_DECAY = frozenset({"cls_token", "mask_token"})

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
        dim: int,
        depth: int,
        heads: int,
        dim_head: int = 64,
        channels: int = 3,
        decoder_depth: int | None = None,
        norm_pix_loss: bool = False,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        ista: float = 0.1,
        lambd: float = 0.5,
        num_classes: int = 0,
        pool: str = "cls",
    ):
        super().__init__()
        grid_h, grid_w = check_image_config(image_size, patch_size)
        check_pool(pool)
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.grid = (grid_h, grid_w)
        self.norm_pix_loss = norm_pix_loss
        self.num_classes = num_classes
        self.pool = pool
        num_patches = grid_h * grid_w
        self.patch_embed = PatchEmbed(patch_size, channels, dim)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim).normal_(std=0.02))
        fixed = sincos_pos_embed_2d(dim, grid_h, grid_w)[None]
        self.pos_embed = nn.Parameter(fixed.clone(), requires_grad=False)  # unused, as upstream
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = crate_transformer(dim, depth, heads, dim_head, dropout, ista=ista, lambd=lambd)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, dim).requires_grad_(False)  # unused, as upstream
        self.mask_token = nn.Parameter(torch.empty(1, 1, dim).normal_(std=0.02))
        self.decoder_pos_embed = nn.Parameter(fixed.clone(), requires_grad=False)
        self.decoder = DecoderTransformer(dim, depth if decoder_depth is None else decoder_depth, heads, dim_head)
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        patch_h, patch_w = pair(patch_size)
        self.decoder_pred = nn.Linear(dim, patch_h * patch_w * channels)
        self.patchify = Patchify(patch_h, patch_w)
        self.to_latent = nn.Identity()
        if num_classes:
            self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
        if num_patches < 2:
            raise ValueError(f"CRATEMAE needs at least 2 patches to mask some and keep some, got {num_patches}")

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, L, p1·p2·C) → (B, C, H, W); the inverse of ``patchify``."""
        (grid_h, grid_w), (p1, p2) = self.grid, pair(self.patch_size)
        x = patches.reshape(patches.shape[0], grid_h, grid_w, p1, p2, self.channels)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(patches.shape[0], self.channels, grid_h * p1, grid_w * p2)

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample, keep ``int(L·(1 − mask_ratio))`` patches: those with the smallest ``noise``.

        Args:
            x: (B, L, D) patch embeddings. noise: (B, L), ``torch.rand`` when None (as upstream).

        Returns:
            x with the masked patches replaced by ``mask_token`` (B, L, D); mask (B, L) in x's dtype, 1 = masked.
        """
        B, L, _ = x.shape
        if not 0 <= mask_ratio <= 1:
            raise ValueError(f"mask_ratio must lie in [0, 1], got {mask_ratio}")
        len_keep = int(L * (1 - mask_ratio))
        if len_keep == L:
            raise ValueError(f"mask_ratio {mask_ratio} masks none of the {L} patches; the loss needs at least one")
        noise = torch.rand(B, L, device=x.device) if noise is None else noise
        if noise.shape != (B, L):
            raise ValueError(f"noise must have shape (B, L) = {(B, L)}, got {tuple(noise.shape)}")
        rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # rank of each patch's noise in its sample
        mask = (rank >= len_keep).to(x.dtype)
        return torch.where(mask[..., None].bool(), self.mask_token.to(x.dtype), x), mask

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.decoder_pos_embed
        return self.norm(self.transformer(self.dropout(x)))

    def forward_encoder(
        self, images: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) → latent (B, 1 + L, D) with masked patches as mask tokens, and mask (B, L)."""
        check_images(images, self.channels, self.image_size)
        x, mask = self.random_masking(self.patch_embed(images), mask_ratio, noise)
        return self._encode(x), mask

    def forward_decoder(self, latent: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + L, D) → predicted patches (B, L, p1·p2·C), class token dropped."""
        return self.decoder_pred(self.decoder_norm(self.decoder(latent)))[:, 1:]

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over masked patches of the per-patch MSE (targets normalised per patch with ``norm_pix_loss``)."""
        target = self.patchify(images)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = F.mse_loss(pred, target, reduction="none").mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(
        self, images: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) → (loss (), pred (B, L, p1·p2·C), mask (B, L) with 1 = masked).

        ``noise`` (B, L) picks the kept patches (the smallest values); ``torch.rand`` when None.
        """
        latent, mask = self.forward_encoder(images, mask_ratio, noise)
        pred = self.forward_decoder(latent)
        return self.forward_loss(images, pred, mask), pred, mask

    def reconstruct(
        self, images: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, C, H, W): visible patches as given, masked ones predicted. With ``norm_pix_loss`` the predictions are
        mapped back to pixels with each true patch's mean and std (MAE's visualisation)."""
        _, pred, mask = self(images, mask_ratio, noise)
        target = self.patchify(images)
        if self.norm_pix_loss:
            pred = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        return self.unpatchify(torch.where(mask[..., None].bool(), pred, target))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → encoder output without masking (B, 1 + L, D), after the final norm."""
        check_images(images, self.channels, self.image_size)
        return self._encode(self.patch_embed(images))

    def _reset_head(self, num_classes: int) -> None:
        """A fresh ``mlp_head`` (LayerNorm, Linear) for ``num_classes`` outputs; 0 removes it (upstream's keys)."""
        dim = self.norm.normalized_shape[0]
        if num_classes:
            self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
        elif hasattr(self, "mlp_head"):
            del self.mlp_head
