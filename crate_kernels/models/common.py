"""The pieces every CRATE family member shares: layers, patches, checks, key renaming, and the image-classifier base.

Attribute names give exactly upstream's state_dict keys (docs/design.md, "The model family"): ``PreNorm`` holds
``norm.*`` and ``fn.*``, ``Transformer`` holds ``layers.{i}.{0,1}``, the classifiers hold ``pos_embedding``,
``cls_token`` and ``mlp_head.{0,1}``.
"""

import math
import re
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from crate_kernels.modules import ISTA, MSSA


def rename_prefixes(state: Mapping[str, torch.Tensor], pairs: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """A state_dict whose keys starting with a source prefix start with its target instead.

    ``pairs``: (source, target) prefixes; ``{i}`` stands for a layer index, carried from source to target.
    Keys no pair matches are kept.
    """
    rules = [
        (re.compile("^" + re.escape(src).replace(re.escape("{i}"), r"(\d+)")), dst.replace("{i}", r"\1"))
        for src, dst in pairs
    ]
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key, found = pattern.subn(replacement, key)
            if found:
                break
        renamed[key] = value
    return renamed


class KeyLayout:
    """An upstream key layout as (ours, upstream) prefix pairs; ``{i}`` is the layer index."""

    def __init__(self, pairs: Sequence[tuple[str, str]]):
        self.pairs = list(pairs)

    def to_ours(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Upstream keys → ours."""
        return rename_prefixes(state, [(theirs, ours) for ours, theirs in self.pairs])

    def to_upstream(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our keys → upstream's."""
        return rename_prefixes(state, self.pairs)


def pair(t: int | tuple[int, int]) -> tuple[int, int]:
    return t if isinstance(t, tuple) else (t, t)


def check_image_config(image_size: int | tuple[int, int], patch_size: int | tuple[int, int]) -> tuple[int, int]:
    """(grid height, grid width) of patches; ValueError when the image does not split into whole patches."""
    (ih, iw), (ph, pw) = pair(image_size), pair(patch_size)
    if min(ih, iw, ph, pw) < 1:
        raise ValueError(f"image_size and patch_size must be positive, got {image_size} and {patch_size}")
    if ih % ph or iw % pw:
        raise ValueError(f"image_size {image_size} must be divisible by patch_size {patch_size}")
    return ih // ph, iw // pw


def check_pool(pool: str) -> None:
    if pool not in {"cls", "mean"}:
        raise ValueError(f"pool must be 'cls' (class token) or 'mean' (mean pooling), got {pool!r}")


def check_images(images: torch.Tensor, channels: int, image_size: int | tuple[int, int]) -> None:
    expected = (channels, *pair(image_size))
    if images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}")


def image_grid(images: torch.Tensor, channels: int, patch_size: int | tuple[int, int]) -> tuple[int, int]:
    """The patch grid of images (B, C, H, W) of any size that splits into whole patches; ValueError otherwise."""
    (ph, pw) = pair(patch_size)
    if images.dim() != 4 or images.shape[1] != channels or images.shape[2] % ph or images.shape[3] % pw:
        raise ValueError(
            f"images must have shape (B, {channels}, H, W) with H, W multiples of the patch size {(ph, pw)}, "
            f"got {tuple(images.shape)}"
        )
    return images.shape[2] // ph, images.shape[3] // pw


def resize_pos_embedding(
    pe: torch.Tensor, grid: tuple[int, int], source_grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """(1, 1 + L, D) → (1, 1 + gh·gw, D): the class token's position kept, the patch positions (a ``source_grid``,
    square when not given) resized bicubically to ``grid`` (in fp32, ``align_corners=False``)."""
    cls, patches = pe[:, :1], pe[:, 1:]
    if source_grid is None:
        side = math.isqrt(patches.shape[1])
        source_grid = (side, side)
    patches = patches.reshape(1, *source_grid, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pe.dtype)
    return torch.cat([cls, patches], dim=1)


class PreNorm(nn.Module):
    """``fn(LN(x), **kwargs)``: upstream's pre-norm wrapper (keys ``norm.*`` and ``fn.*``)."""

    def __init__(self, dim: int, fn: nn.Module, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fn(self.norm(x), **kwargs)


class Patchify(nn.Module):
    """(B, C, H, W) → (B, L, p1·p2·C) in einops ``'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'`` order; no parameters."""

    def __init__(self, patch_height: int, patch_width: int):
        super().__init__()
        self.p1, self.p2 = patch_height, patch_width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B, C, Hi, Wi = images.shape
        x = images.reshape(B, C, Hi // self.p1, self.p1, Wi // self.p2, self.p2)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (Hi // self.p1) * (Wi // self.p2), self.p1 * self.p2 * C)


class Transformer(nn.Module):
    """``depth`` CRATE layers; ``layers[i] = [PreNorm(attention), PreNorm(ista)]`` as upstream.

    Each layer: ``z_half = z + attn(LN₁(z))``, then ``z_next = ista(LN₂(z_half))``, or with ``ista_residual``
    (CRATE-α) ``z_next = z_half + ista(LN₂(z_half))`` with the residual fused into the ISTA op. Subclasses with
    another layer equation (the CRATE-MAE decoder) override ``_layer``.

    Args:
        dim: D. depth: number of layers.
        pair: builds one layer's two inner modules, each wrapped in a PreNorm (called ``depth`` times); with
            ``ista_residual`` the second one's forward takes ``residual=``.
        eps: LayerNorm epsilon (1e-5; 1e-6 in CRATE-α).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        pair: Callable[[], tuple[nn.Module, nn.Module]],
        *,
        eps: float = 1e-5,
        ista_residual: bool = False,
    ):
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.ista_residual = ista_residual
        self.grad_checkpointing = False
        self.layers = nn.ModuleList(nn.ModuleList(PreNorm(dim, fn, eps) for fn in pair()) for _ in range(depth))

    def _layer(self, attn: PreNorm, ff: PreNorm, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        z_half = x + attn(x, attn_mask=attn_mask)
        return ff(z_half, residual=z_half) if self.ista_residual else ff(z_half)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D) → (B, N, D); attn_mask as ``crate_kernels.mssa``."""
        for first, second in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._layer, first, second, x, attn_mask, use_reentrant=False)
            else:
                x = self._layer(first, second, x, attn_mask)
        return x


def crate_transformer(
    dim: int, depth: int, heads: int, dim_head: int, dropout: float = 0.0, ista: float = 0.1, lambd: float = 0.1
) -> Transformer:
    """Vanilla CRATE layers: MSSA with out bias, square ISTA (η = ``ista``, λ = ``lambd``), no ISTA residual."""
    return Transformer(
        dim,
        depth,
        lambda: (
            MSSA(dim, heads=heads, dim_head=dim_head, dropout=dropout),
            ISTA(dim, dim, dropout=dropout, step_size=ista, lambd=lambd),
        ),
    )


class GradCheckpointing:
    """``set_grad_checkpointing``: every CRATE layer stack of the model recomputes its layers in backward."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer in backward (``torch.utils.checkpoint``, non-reentrant)."""
        for module in self.modules():
            if isinstance(module, Transformer):
                module.grad_checkpointing = enable


class ClassifierHooks(GradCheckpointing):
    """timm-style hooks of the image models: the pooled tokens through ``mlp_head`` (LayerNorm, Linear).

    The class defines ``forward_features``, ``pool``, ``num_classes``, ``to_latent`` and, when it has a classifier,
    ``mlp_head``; ``NO_WEIGHT_DECAY`` names its token and position parameters.
    """

    NO_WEIGHT_DECAY: frozenset[str] = frozenset()

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """features: (B, 1 + L, D) → logits (B, num_classes), or the pooled (B, D) before ``mlp_head``."""
        x = self.to_latent(features.mean(dim=1) if self.pool == "mean" else features[:, 0])
        if pre_logits:
            return x
        if "mlp_head" not in self._modules:
            raise ValueError("forward_head needs a classifier: build with num_classes > 0 or call reset_classifier")
        return self.mlp_head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, C, H, W) → logits (B, num_classes)."""
        return self.forward_head(self.forward_features(images))

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh ``mlp_head.1`` for ``num_classes`` outputs (0: Identity, the head returns normalised features)."""
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
        self.num_classes = num_classes
        self._reset_head(num_classes)

    def _reset_head(self, num_classes: int) -> None:
        dim = self.mlp_head[0].normalized_shape[0]
        self.mlp_head[1] = nn.Linear(dim, num_classes) if num_classes else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        return set(self.NO_WEIGHT_DECAY)


class ImageClassifier(ClassifierHooks, nn.Module):
    """What CRATE and CRATE-α share: patches embedded by the subclass, a class token and learned positions, CRATE
    layers, then LayerNorm + Linear on the pooled tokens.

    Subclasses build their patch embedding in ``_build_patch_embedding`` (its attribute name is its upstream key
    prefix) and apply it in ``embed_patches``. It is built after the arguments are checked and before the
    positions, so that a seed gives upstream's initial weights.

    Args (in the order the forward pass uses them):
        image_size, patch_size: int or (height, width). channels: C of the images. dim: D.
        emb_dropout: on the embedded tokens. layers: builds the CRATE layers (called once, after the positions).
        pool: ``"cls"`` (token 0) or ``"mean"``. num_classes: head outputs.
    """

    NO_WEIGHT_DECAY = frozenset({"pos_embedding", "cls_token"})

    def __init__(
        self,
        image_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
        channels: int,
        dim: int,
        emb_dropout: float,
        layers: Callable[[], Transformer],
        pool: str,
        num_classes: int,
    ):
        super().__init__()
        grid_h, grid_w = check_image_config(image_size, patch_size)
        check_pool(pool)
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.num_classes = num_classes
        self._build_patch_embedding(pair(patch_size), channels, dim)
        self.pos_embedding = nn.Parameter(torch.randn(1, grid_h * grid_w + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = layers()
        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def _build_patch_embedding(self, patch: tuple[int, int], channels: int, dim: int) -> None:
        raise NotImplementedError

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, C, H, W) → patch tokens (B, L, D)."""
        raise NotImplementedError

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position table (1, 1 + gh·gw, D) of a patch grid: ``pos_embedding`` itself at the constructed grid,
        else its patch part resized bicubically (docs/design.md, "Other input sizes")."""
        native = check_image_config(self.image_size, self.patch_size)
        return self.pos_embedding if grid == native else resize_pos_embedding(self.pos_embedding, grid, native)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, C, H, W), H and W multiples of the patch size → tokens after the last layer (B, 1 + L, D),
        class token first."""
        grid = image_grid(images, self.channels, self.patch_size)
        x = self.embed_patches(images)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.positions(grid)
        return self.transformer(self.dropout(x))
