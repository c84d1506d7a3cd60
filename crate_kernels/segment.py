"""Object masks from a classifier's last layer, without training for them: MaskCut and [CLS] attention.

* ``ncut_masks``: MaskCut (Wang et al. 2023, CutLER). Patch features (N, C) → cosine affinity W binarised at τ
  (1 above, ε = 1e-5 below) → the second-smallest generalised eigenvector x of the Normalized Cut,
  (D − W) x = λ D x, solved as the symmetric ``D^{-1/2} (D − W) D^{-1/2}`` → split at the mean of x; the object is
  the side holding x's largest-magnitude entry, or the other side when it covers more border patches than its
  complement → the next object repeats this on the patches not yet taken.
* ``attention_masks``: DINO's masks (Caron et al. 2021). Per head, the last layer's [CLS] attention over the
  patches; the patches holding the top ``keep`` of its mass; and the union over heads.
* ``segment``: either mask of a CRATE classifier or the ViT baseline, at pixel resolution. MaskCut's features are the
  last layer's keys, which for MSSA are ``qkv(LN(z))`` itself (the CRATE segmentation paper's choice).
* ``mask_iou`` and ``corloc``: the scores, foreground IoU against the ground truth and box IoU ≥ 0.5.

docs/design.md, "Segmentation".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from crate_kernels._checks import check_ndim
from crate_kernels.measure import attention_maps, patch_grid, queries_keys

EPS = 1e-5  # affinity of patch pairs below τ (CutLER's value): keeps the graph connected


def ncut_masks(features: torch.Tensor, grid: tuple[int, int], tau: float = 0.15, num_objects: int = 1) -> torch.Tensor:
    """MaskCut on one image's patch features (module docstring).

    Args:
        features: (N, C) one feature vector per patch, row-major over the grid (N = h·w).
        grid: (h, w), the patch grid.
        tau: cosine-similarity threshold of the binary affinity.
        num_objects: objects cut, one after the other (fewer when the patches run out).

    Returns:
        (num_objects, h, w) bool, object k's patches; objects do not overlap.
    """
    check_ndim("features", features, 2, "(N, C) patch features")
    h, w = grid
    if features.shape[0] != h * w:
        raise ValueError(f"features has {features.shape[0]} rows, the grid {grid} has {h * w} patches")
    f = torch.nn.functional.normalize(features.double(), dim=1)
    affinity = torch.where(f @ f.T > tau, 1.0, EPS)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    border = ((rows == 0) | (rows == h - 1) | (cols == 0) | (cols == w - 1)).flatten().to(features.device)
    free = torch.ones(h * w, dtype=torch.bool, device=features.device)
    masks = torch.zeros(num_objects, h * w, dtype=torch.bool, device=features.device)
    for k in range(num_objects):
        index = free.nonzero().squeeze(1)
        if len(index) < 2:
            break
        W = affinity[index][:, index]
        d_isqrt = W.sum(1).rsqrt()
        laplacian = torch.eye(len(index), dtype=W.dtype, device=W.device) - d_isqrt[:, None] * W * d_isqrt
        x = d_isqrt * torch.linalg.eigh(laplacian).eigenvectors[:, 1]
        side = x > x.mean()
        if not side[x.abs().argmax()]:
            side = ~side
        if (side & border[index]).sum() > (~side & border[index]).sum():
            side = ~side
        masks[k, index[side]] = True
        free[index[side]] = False
    return masks.view(num_objects, h, w)


class AttentionMasks(NamedTuple):
    heads: torch.Tensor  # (B, H, h, w) bool: each head's patches holding ``keep`` of its [CLS] attention mass
    union: torch.Tensor  # (B, h, w) bool: any head's


def attention_masks(model: nn.Module, images: torch.Tensor, keep: float = 0.6) -> AttentionMasks:
    """DINO's masks from the last layer's [CLS] attention (module docstring).

    Args:
        model: a CRATE-family classifier or the ViT baseline. images: (B, C, Hi, Wi), as the model takes them.
        keep: share of each head's attention mass kept, in (0, 1].

    Returns:
        ``AttentionMasks``: per head (B, H, h, w) and their union (B, h, w), on the patch grid.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    maps = attention_maps(model, images)  # (B, H, h, w)
    flat = maps.flatten(2)
    flat = flat / flat.sum(-1, keepdim=True)
    ascending, order = flat.sort(-1)
    kept_sorted = ascending.cumsum(-1) > 1 - keep  # the largest entries, holding `keep` of the mass
    heads = torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted).view(maps.shape)
    return AttentionMasks(heads, heads.any(1))


def segment(
    model: nn.Module,
    images: torch.Tensor,
    method: str = "maskcut",
    *,
    tau: float = 0.15,
    num_objects: int = 1,
    keep: float = 0.6,
) -> torch.Tensor:
    """Foreground masks of ``images`` at pixel resolution, from the model's last layer.

    Args:
        model: a CRATE-family classifier or the ViT baseline (class token first). images: (B, C, Hi, Wi).
        method: ``"maskcut"`` (``ncut_masks`` on the last layer's keys, the union of ``num_objects`` objects, cut at
            ``tau``) or ``"attention"`` (the union of ``attention_masks`` at ``keep``).

    Returns:
        (B, Hi, Wi) bool; each patch's decision covers its pixels.
    """
    check_ndim("images", images, 4, "(B, C, H, W) images")
    if method == "attention":
        patches = attention_masks(model, images, keep).union
    elif method == "maskcut":
        _, keys, _ = queries_keys(model, images)  # (B, H, 1 + h·w, P)
        features = keys[:, :, 1:].transpose(1, 2).flatten(2)  # (B, h·w, H·P), the [CLS] token left out
        grid = patch_grid(images.shape[-2:], features.shape[1])
        patches = torch.stack([ncut_masks(f, grid, tau, num_objects).any(0) for f in features])
    else:
        raise ValueError(f"method must be 'maskcut' or 'attention', got {method!r}")
    return to_pixels(patches, images.shape[-2:])


def to_pixels(patches: torch.Tensor, image_hw: Sequence[int]) -> torch.Tensor:
    """Masks on the patch grid (..., h, w) → (..., Hi, Wi): each patch's value over its pixels."""
    ph, pw = image_hw[0] // patches.shape[-2], image_hw[1] // patches.shape[-1]
    return patches.repeat_interleave(ph, -2).repeat_interleave(pw, -1)


def mask_iou(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(n,) IoU of predicted and true foreground masks, both (n, H, W) bool; 1 where both are empty."""
    inter, union = (pred & truth).flatten(1).sum(1), (pred | truth).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp_min(1), 1.0)


def boxes(masks: torch.Tensor) -> torch.Tensor:
    """(n, 4) float (top, left, bottom, right), exclusive ends, of each (n, H, W) mask's pixels; zeros when empty."""
    rows, cols = masks.any(2), masks.any(1)

    def ends(hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = hit.float().argmax(1)
        last = hit.shape[1] - hit.flip(1).float().argmax(1)
        present = hit.any(1)
        return torch.where(present, first, 0), torch.where(present, last, 0)

    (top, bottom), (left, right) = ends(rows), ends(cols)
    return torch.stack([top, left, bottom, right], 1).float()


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes a (n, 4) and b (n, 4), row by row."""
    h = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp_min(0)
    w = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp_min(0)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    inter = h * w
    return inter / (area(a) + area(b) - inter).clamp_min(1e-9)


def corloc(pred: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """(n,) bool: the box around each predicted mask (n, H, W) has IoU ≥ 0.5 with the box of some true object.

    ``objects`` (n, H, W) int: 0 background, k > 0 object k's pixels. An empty prediction is never correct.
    """
    predicted = boxes(pred)
    hit = torch.zeros(len(pred), dtype=torch.bool, device=pred.device)
    for k in objects.unique().tolist():
        if k > 0:
            truth = objects == k
            hit |= (box_iou(predicted, boxes(truth)) >= 0.5) & truth.flatten(1).any(1) & pred.flatten(1).any(1)
    return hit
