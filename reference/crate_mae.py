"""CRATE-MAE (upstream Ma-Lab-Berkeley/CRATE ``model/crate_ae/``: crate_ae.py, crate_encoder.py, crate_decoder.py,
pos_embed.py): the white-box masked autoencoder.

Facts transcribed from upstream, quirks included:
- Encoder blocks are vanilla CRATE layers with λ = 0.5 (``Block_CRATE`` in crate_encoder.py holds ONE layer under
  ``layers.0``). Decoder blocks invert them: ``y_half = LN(y)·Dᵀ`` (a linear synthesis, no relu), then
  ``y_next = y_half − MSSA(LN(y_half))``; the decoder's pair is [PreNorm(FeedForward), PreNorm(Attention)].
- ``forward_encoder`` masks a random 75 % of the patches, then puts ``mask_token`` back in their places and runs the
  ENCODER on the full sequence with ``decoder_pos_embed`` added; ``pos_embed`` and ``decoder_embed`` are built (and
  saved in checkpoints) but never used. Both position embeddings are fixed 2-D sin-cos (``requires_grad=False``).
- The final norms ``norm`` and ``decoder_norm`` use eps 1e-6; the blocks' pre-norms use 1e-5.
- Loss: per-patch MSE (optionally on per-patch normalised pixels), averaged over the masked patches.
``in_chans`` is honoured in patchify/unpatchify (upstream hard-codes 3 there); upstream's init is kept only where it
shapes parameters (the tests load random weights).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init

from reference.ista import FeedForward as ISTAFeedForward
from reference.mssa import Attention


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> torch.Tensor:
    """(grid_size², D) or (1 + grid_size², D) with a zero row for the class token; float64.

    Half the channels encode the column index, half the row index (upstream's meshgrid puts w first), each as
    ``[sin(pos·ω), cos(pos·ω)]`` with ``ω_i = 10000^(−i / (D/4))``.
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # grid_w[i, j] = j, grid_h[i, j] = i

    def one_dim(dim: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    emb = torch.cat([one_dim(embed_dim // 2, grid_w), one_dim(embed_dim // 2, grid_h)], dim=1)
    return torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb]) if cls_token else emb


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class EncoderFeedForward(ISTAFeedForward):
    """crate_encoder.py ``FeedForward``: the ISTA step with λ = 0.5 by default."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, step_size: float = 0.1, lambd: float = 0.5):
        super().__init__(dim, hidden_dim, dropout, step_size)
        self.lambd = lambd


class DecoderFeedForward(nn.Module):
    """crate_decoder.py ``FeedForward``: ``F.linear(x, weight) = x Dᵀ``, the linear synthesis."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, step_size: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        with torch.no_grad():
            init.kaiming_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class EncoderBlock(nn.Module):
    """crate_encoder.py ``Block_CRATE``: ``z_half = z + MSSA(LN(z))``; ``z_next = ISTA(LN(z_half))``."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0, ista: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        PreNorm(dim, Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout)),
                        PreNorm(dim, EncoderFeedForward(dim, dim, dropout=dropout, step_size=ista)),
                    ]
                )
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = ff(attn(x) + x)
        return x


class DecoderBlock(nn.Module):
    """crate_decoder.py ``Block_CRATE``: ``y_half = LN(y)·Dᵀ``; ``y_next = y_half − MSSA(LN(y_half))``."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0, ista: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        PreNorm(dim, DecoderFeedForward(dim, dim, dropout=dropout, step_size=ista)),
                        PreNorm(dim, Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout)),
                    ]
                )
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for ff, attn in self.layers:
            grad_x = ff(x)
            x = grad_x - attn(grad_x)
        return x


class PatchEmbed(nn.Module):
    """timm ``PatchEmbed``: a strided conv (``proj``), then (B, D, h, w) → (B, h·w, D)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class MaskedAutoencoderCRATE(nn.Module):
    """crate_ae.py ``MaskedAutoencoderViT`` with CRATE encoder and decoder blocks (``mae_crate_*``)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = False,
    ):
        super().__init__()
        self.in_chans = in_chans
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [EncoderBlock(dim=embed_dim, heads=num_heads, dim_head=embed_dim // num_heads) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                DecoderBlock(
                    dim=decoder_embed_dim, heads=decoder_num_heads, dim_head=decoder_embed_dim // decoder_num_heads
                )
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self.norm_pix_loss = norm_pix_loss
        grid = math.isqrt(num_patches)
        with torch.no_grad():
            self.pos_embed.copy_(get_2d_sincos_pos_embed(embed_dim, grid, cls_token=True)[None])
            self.decoder_pos_embed.copy_(get_2d_sincos_pos_embed(decoder_embed_dim, grid, cls_token=True)[None])

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, L, p·p·C), einsum 'nchpwq->nhwpqc'."""
        p = self.patch_embed.patch_size[0]
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], self.in_chans, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * w, p * p * self.in_chans)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_embed.patch_size[0]
        h = w = math.isqrt(x.shape[1])
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, self.in_chans))
        return x.reshape(x.shape[0], self.in_chans, h * p, w * p)

    def random_masking(self, x: torch.Tensor, mask_ratio: float):
        """Keep ``int(L·(1 − mask_ratio))`` patches chosen by argsort of ``torch.rand(B, L)``; mask: 1 = removed."""
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        noise = torch.rand(N, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, x: torch.Tensor, mask_ratio: float):
        x = self.patch_embed(x)
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def mae_crate(size: str, **kwargs) -> MaskedAutoencoderCRATE:
    """Upstream ``mae_crate_{tiny,small,base,large}``: decoder width, depth and heads equal the encoder's."""
    dim, depth, heads = {"tiny": (384, 12, 6), "small": (576, 12, 12), "base": (768, 12, 12), "large": (1024, 24, 16)}[
        size
    ]
    return MaskedAutoencoderCRATE(
        patch_size=16,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        decoder_embed_dim=dim,
        decoder_depth=depth,
        decoder_num_heads=heads,
        **kwargs,
    )
