"""Image transforms written on tensors (torchvision does not load beside the CPU torch here).

Every random transform draws from the sample's own stream (``streams``: ``augment`` for crop, flip, shift and
RandAugment, ``mix`` for Mixup / CutMix), so a sample's augmentation is a function of (seed, epoch, sample id) alone.

- :func:`crop_box`: a RandomResizedCrop box (area share in [scale, 1], aspect ratio in [3/4, 4/3], clipped).
- :func:`draw_shift`: a random translation of up to a share of each side (RandomAffine's ``translate``).
- :func:`center_box`: the eval crop, resize to ``size · 256/224`` then centre crop ``size``, as one box.
- :func:`resized_crop`: a box of an image resized to ``size × size`` (bilinear, antialiased).
- :func:`rand_augment`: RandAugment (Cubuk et al. 2020), torchvision's op set and magnitudes, on one image.
- :func:`mix_pairs`: Mixup / CutMix of each sample with its neighbour (pairs 0-1, 2-3, ...) in the global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from crate_kernels.train import streams

EVAL_RATIO = 256 / 224  # eval resize side over crop side (the ImageNet recipe)


@dataclass(frozen=True)
class Augment:
    """A training set's random transforms, drawn per sample from stream ``augment`` (seed, epoch, sample).

    ``crop_scale``: smallest area share of the random resized crop (1.0 and no flip: no crop); ``hflip``: mirror with
    probability ½; ``randaugment``: RandAugment ops per image (0 = off) at ``magnitude`` (0–30); ``translate``: shift
    each image by up to this share of its side along each axis (0 = off).
    """

    seed: int
    crop_scale: float = 1.0
    hflip: bool = False
    randaugment: int = 0
    magnitude: int = 9
    translate: float = 0.0

    @property
    def active(self) -> bool:
        return self.crop_scale < 1 or self.hflip or self.randaugment > 0 or self.translate > 0

    def generator(self, epoch: int, sample: int) -> torch.Generator:
        return streams.generator("augment", self.seed, epoch, sample)


def crop_box(
    H: int, W: int, scale: float, g: torch.Generator, whole_pixels: bool, max_scale: float = 1.0
) -> tuple[float, float, float, float]:
    """(top, left, height, width) of a random resized crop of an H × W image: an area share in [scale, max_scale]
    and a log-uniform aspect ratio in [3/4, 4/3] at a uniform position, each side clipped to the image.

    torchvision's RandomResizedCrop redraws a box that does not fit (ten tries, then a centre crop); clipping it
    instead is what the small embedded sets trained with from the start (on 8 × 8 digits at scale 0.85, 72 % of
    draws do not fit, and redrawing them weakens the augmentation: held-out accuracy fell from ~94 % to ~93 % over
    three seeds). At the paper's scale 0.08, 14 % of the draws are clipped. ``whole_pixels`` rounds the box to pixels
    (to crop a decoded image); otherwise it stays fractional (to resample a small in-memory image).
    """
    area, log_ratio, u_top, u_left = torch.rand(4, generator=g).tolist()
    area = H * W * (scale + (max_scale - scale) * area)
    ratio = math.exp(math.log(3 / 4) + log_ratio * math.log(16 / 9))
    w, h = min(W, math.sqrt(area * ratio)), min(H, math.sqrt(area / ratio))
    if whole_pixels:  # a uniform integer position, as torchvision's randint(0, H - h + 1)
        w, h = max(1, round(w)), max(1, round(h))
        return int(u_top * (H - h + 1)), int(u_left * (W - w + 1)), h, w
    return u_top * (H - h), u_left * (W - w), h, w


def center_box(H: int, W: int) -> tuple[int, int, int, int]:
    """The eval crop as a box of the original image: resizing the shorter side to ``size · 256/224`` and centre
    cropping ``size`` keeps the centred square of side ``shorter / (256/224)``."""
    side = max(1, round(min(H, W) / EVAL_RATIO))
    return (H - side) // 2, (W - side) // 2, side, side


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(..., C, h, w) float images in [0, 1] -> (..., C, size, size), bilinear with antialiasing."""
    if images.shape[-2:] == (size, size):
        return images
    flat = images.reshape(-1, *images.shape[-3:])
    out = F.interpolate(flat, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.clamp(0, 1).reshape(*images.shape[:-2], size, size)


def resized_crop(image: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """(C, H, W) -> (C, size, size): the box (top, left, height, width) resized."""
    top, left, h, w = box
    return resize(image[:, top : top + h, left : left + w], size)


def crop_and_flip(H: int, W: int, augment: Augment, g: torch.Generator, whole_pixels: bool) -> tuple[tuple, bool]:
    """A sample's crop box (the whole image when ``crop_scale`` is 1) and whether it is mirrored, drawn from ``g``."""
    box = crop_box(H, W, augment.crop_scale, g, whole_pixels) if augment.crop_scale < 1 else (0, 0, H, W)
    return box, augment.hflip and float(torch.rand((), generator=g)) < 0.5


def draw_shift(H: int, W: int, translate: float, g: torch.Generator) -> tuple[float, float]:
    """(dy, dx) in pixels, each uniform in [−translate·side, translate·side]; (0, 0) without a draw when
    ``translate`` is 0 (the sample's later draws stay what they were without it)."""
    if translate == 0:
        return 0.0, 0.0
    uy, ux = torch.rand(2, generator=g).tolist()
    return (2 * uy - 1) * translate * H, (2 * ux - 1) * translate * W


def train_transform(image: torch.Tensor, size: int, augment: Augment, epoch: int, sample: int) -> torch.Tensor:
    """A decoded (C, H, W) image in [0, 1] -> its training view (C, size, size): crop, flip, shift, RandAugment."""
    g = augment.generator(epoch, sample)
    box, flip = crop_and_flip(*image.shape[-2:], augment, g, whole_pixels=True)
    out = resized_crop(image, box, size)
    out = out.flip(-1) if flip else out
    dy, dx = draw_shift(size, size, augment.translate, g)
    out = _affine(out, [1, 0, -2 * round(dx) / size, 0, 1, -2 * round(dy) / size]) if (dy, dx) != (0, 0) else out
    return rand_augment(out, augment.randaugment, augment.magnitude, g) if augment.randaugment else out


def eval_transform(image: torch.Tensor, size: int) -> torch.Tensor:
    """A decoded (C, H, W) image in [0, 1] -> its eval view (C, size, size): resize, centre crop."""
    return resized_crop(image, center_box(*image.shape[-2:]), size)


# ---- RandAugment ----


def box_theta(
    H: int, W: int, box: tuple[float, float, float, float], flip: bool, shift: tuple[float, float] = (0.0, 0.0)
) -> torch.Tensor:
    """The (2, 3) ``affine_grid`` matrix that resamples ``box`` (top, left, height, width) of an H × W image, mirrored
    with ``flip`` and moved by ``shift`` (dy, dx) pixels (``affine_grid`` maps output to input in coordinates where
    [-1, 1] spans the image)."""
    (top, left, h, w), (dy, dx) = box, shift
    return torch.tensor(
        [[-w / W if flip else w / W, 0, (2 * (left - dx) + w) / W - 1], [0, h / H, (2 * (top - dy) + h) / H - 1]]
    )


def resample(images: torch.Tensor, theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Images (n, C, H, W) resampled through ``theta`` (n, 2, 3) to ``size`` (h, w): bilinear (fractional boxes of
    small images), what falls outside an image the border reflected."""
    grid = F.affine_grid(theta.to(images), [*images.shape[:2], *size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _affine(image: torch.Tensor, matrix: list[float]) -> torch.Tensor:
    """``image`` (C, H, W) sampled at ``matrix`` (2 × 3, normalised output -> input coordinates); nearest, black."""
    theta = torch.tensor(matrix, dtype=image.dtype).view(1, 2, 3)
    grid = F.affine_grid(theta, [1, *image.shape], align_corners=False)
    return F.grid_sample(image[None], grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]


def _rotate(image: torch.Tensor, angle: float) -> torch.Tensor:
    cos, sin = math.cos(angle), math.sin(angle)
    return _affine(image, [cos, -sin, 0, sin, cos, 0])


def _blend(image: torch.Tensor, other: torch.Tensor, factor: float) -> torch.Tensor:
    return (other + factor * (image - other)).clamp(0, 1)


def _grey(image: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype)
    return (image * weights[:, None, None]).sum(0, keepdim=True) if image.shape[0] == 3 else image.mean(0, True)


def _equalize(image: torch.Tensor) -> torch.Tensor:
    """Per-channel histogram equalisation of the 8-bit levels (PIL's ImageOps.equalize)."""
    levels = (image * 255).round().long()
    out = []
    for channel in levels:
        hist = torch.bincount(channel.flatten(), minlength=256)
        nonzero = hist[hist > 0]
        step = (hist.sum() - nonzero[-1]) // 255 if len(nonzero) else 0
        if step == 0:
            out.append(channel)
            continue
        lut = ((torch.cumsum(hist, 0) - hist + step // 2) // step).clamp(0, 255)
        out.append(lut[channel])
    return torch.stack(out).to(image.dtype) / 255


def _sharpness(image: torch.Tensor, factor: float) -> torch.Tensor:
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=image.dtype) / 13
    C = image.shape[0]
    smooth = F.conv2d(image[None], kernel.expand(C, 1, 3, 3), groups=C)[0]
    blurred = image.clone()
    blurred[:, 1:-1, 1:-1] = smooth  # PIL keeps the border pixels
    return _blend(image, blurred, factor)


def _posterize(image: torch.Tensor, dropped_bits: int) -> torch.Tensor:
    step = 2**dropped_bits
    return torch.floor((image * 255).round() / step) * step / 255


def _autocontrast(image: torch.Tensor) -> torch.Tensor:
    low = image.amin(dim=(1, 2), keepdim=True)
    high = image.amax(dim=(1, 2), keepdim=True)
    scale = torch.where(high > low, 1 / (high - low).clamp_min(1e-12), torch.ones_like(high))
    return torch.where(high > low, (image - low) * scale, image).clamp(0, 1)


# name -> (image, signed magnitude in [-1, 1] · the op's range) -> image; torchvision's ranges at magnitude 30.
_OPS = {
    "identity": lambda x, m: x,
    "shear_x": lambda x, m: _affine(x, [1, 0.3 * m, 0, 0, 1, 0]),
    "shear_y": lambda x, m: _affine(x, [1, 0, 0, 0.3 * m, 1, 0]),
    "translate_x": lambda x, m: _affine(x, [1, 0, 2 * 150 / 331 * m, 0, 1, 0]),
    "translate_y": lambda x, m: _affine(x, [1, 0, 0, 0, 1, 2 * 150 / 331 * m]),
    "rotate": lambda x, m: _rotate(x, math.radians(30 * m)),
    "brightness": lambda x, m: _blend(x, torch.zeros_like(x), 1 + 0.9 * m),
    "color": lambda x, m: _blend(x, _grey(x).expand_as(x), 1 + 0.9 * m),
    "contrast": lambda x, m: _blend(x, _grey(x).mean().expand_as(x), 1 + 0.9 * m),
    "sharpness": lambda x, m: _sharpness(x, 1 + 0.9 * m),
    "posterize": lambda x, m: _posterize(x, round(4 * abs(m))),
    "solarize": lambda x, m: torch.where(x >= 1 - abs(m), 1 - x, x),
    "autocontrast": lambda x, m: _autocontrast(x),
    "equalize": lambda x, m: _equalize(x),
}
_SIGNED = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast", "sharpness"}


def rand_augment(image: torch.Tensor, ops: int, magnitude: int, g: torch.Generator) -> torch.Tensor:
    """``ops`` ops drawn uniformly (with replacement) from torchvision's 14, each at ``magnitude`` of 30 (a random
    sign for the signed ones), applied to ``image`` (C, H, W) in [0, 1]."""
    names = list(_OPS)
    for _ in range(ops):
        choice, sign = torch.rand(2, generator=g).tolist()
        name = names[int(choice * len(names))]
        m = magnitude / 30 * (-1 if name in _SIGNED and sign < 0.5 else 1)
        image = _OPS[name](image, m)
    return image


# ---- Mixup and CutMix ----


def mix_pairs(
    images: torch.Tensor, samples: torch.Tensor, seed: int, epoch: int, mixup: float, cutmix: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix each sample with its partner: samples 0-1, 2-3, ... of the micro-batch (an even number) are partners.

    Per sample, from stream ``mix`` (seed, epoch, sample): with both on, CutMix or Mixup with probability ½; then a
    weight λ ~ Beta(a, a). Mixup blends ``λ·x + (1 − λ)·partner``; CutMix pastes the partner into a box of area share
    1 − λ (clipped to the image, λ corrected to the pasted area). Micro-batches have an even size, so partners are
    neighbours in the global batch too, whatever the world size.

    Args:
        images: (b, C, H, W) normalised images. samples: (b,) their ids.
    Returns:
        mixed images (b, C, H, W), each sample's partner index (b,) int64 and its own label's weight λ (b,) float32.
    """
    b, _, H, W = images.shape
    if b % 2:
        raise ValueError(f"images must be an even number of samples (pairs are mixed), got {b}")
    partner = torch.arange(b) ^ 1
    mixed, lam = images.clone(), torch.ones(b)
    for i, s in enumerate(samples.tolist()):
        rng = np.random.default_rng(streams.seed("mix", seed, epoch, s))
        use_cutmix = cutmix > 0 and (mixup == 0 or rng.random() < 0.5)
        weight = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
        other = images[partner[i]]
        if use_cutmix:
            cut_h, cut_w = round(H * math.sqrt(1 - weight)), round(W * math.sqrt(1 - weight))
            cy, cx = int(rng.integers(H)), int(rng.integers(W))
            top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, H)
            left, right = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, W)
            mixed[i, :, top:bottom, left:right] = other[:, top:bottom, left:right]
            weight = 1 - (bottom - top) * (right - left) / (H * W)
        else:
            mixed[i] = weight * images[i] + (1 - weight) * other
        lam[i] = weight
    return mixed, partner, lam
