"""``shapes``: a procedurally drawn image set with pixel-exact object masks, for classification and segmentation.

Each image (default 64×64 RGB) holds one to three objects over textured clutter. An object is one of ``CLASSES``
(ellipse, triangle, square, star, cross) at a random place, size, rotation and aspect, filled with a saturated colour
from its class's hue band (so that a small model learns the label in minutes; it still has to find the object among
the clutter's colours) and darker stripes. The first object is the main one: larger than the others (radius 0.4-0.65
of the half-side against 0.16-0.36) and drawn on top of them. The background is greyish smooth colour noise, a faint
grating and pixel noise. The class label is that of the object with the most visible pixels. Everything is drawn
with batched torch ops from one generator seeded by ``seed`` (thousands of images per second; no download, no file).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CLASSES = ("ellipse", "triangle", "square", "star", "cross")
MAX_OBJECTS = 3
COUNT = 4000  # images of ``--data shapes`` (train and held-out together)
_CHUNK = 256  # images drawn per batch of tensor ops (fixed: the draws of image i do not depend on ``count``)


@dataclass
class Shapes:
    """``images`` (n, 3, S, S) float32 in [0, 1]; ``labels`` (n,) int64 the largest visible object's class;
    ``masks`` (n, S, S) uint8: 0 background, k the k-th drawn object's visible pixels (k = 1..3); ``classes``
    (n, 3) int64 each object's class, −1 where the image has fewer objects."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    classes: torch.Tensor


def generate(count: int = COUNT, size: int = 64, seed: int = 0) -> Shapes:
    """``count`` images of side ``size``; the same ``seed`` gives the same images, bit for bit."""
    if count < 1 or size < 8:
        raise ValueError(f"count must be >= 1 and size >= 8, got {count} and {size}")
    g = torch.Generator().manual_seed(seed)
    parts = [_draw(_CHUNK, size, g) for _ in range(math.ceil(count / _CHUNK))]
    images, masks, classes = (torch.cat(p)[:count] for p in zip(*parts, strict=True))
    areas = torch.stack([(masks == k + 1).flatten(1).sum(1) for k in range(MAX_OBJECTS)], 1)  # (n, 3)
    labels = classes.gather(1, areas.argmax(1, keepdim=True)).squeeze(1)
    return Shapes(images, labels, masks, classes)


def _inside(cls: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, aspect: torch.Tensor):
    """(b, S, S) bool: pixels inside a shape of class ``cls`` (b,) and radius ``r`` (b, 1, 1), in its own rotated
    coordinates ``u``, ``v`` (b, S, S)."""
    rho, phi = torch.hypot(u, v), torch.atan2(v, u) + math.pi

    def polygon(k: int) -> torch.Tensor:  # a regular k-gon with circumradius r: radius at each angle
        sector = 2 * math.pi / k
        return rho <= r * math.cos(math.pi / k) / torch.cos(torch.remainder(phi, sector) - sector / 2)

    tip = (torch.remainder(phi, 2 * math.pi / 5) / (2 * math.pi / 5) - 0.5).abs() * 2  # 1 at the 5 tips, 0 between
    arm = 0.3 * r
    shapes = [
        (u / r).square() + (v / (r * aspect)).square() <= 1,
        polygon(3),
        polygon(4),
        rho <= r * (0.45 + 0.55 * tip),
        ((u.abs() <= arm) & (v.abs() <= r)) | ((v.abs() <= arm) & (u.abs() <= r)),
    ]
    return torch.stack(shapes, 1).gather(1, cls[:, None, None, None].expand(-1, 1, *u.shape[1:])).squeeze(1)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Hue, saturation, value (b,) in [0, 1] → RGB (b, 3, 1, 1)."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6 * h[:, None]) % 6  # (b, 3)
    rgb = v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))
    return rgb[..., None, None]


def _draw(b: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``b`` images (b, 3, S, S), instance masks (b, S, S) uint8 and object classes (b, 3), from ``g``."""
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    axis = (torch.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    Y, X = torch.meshgrid(axis, axis, indexing="ij")
    # Clutter: smooth colour noise around a greyish base colour, a faint grating, pixel noise.
    base = 0.3 + 0.3 * rand(b, 1, 1, 1) + 0.1 * rand(b, 3, 1, 1)
    smooth = F.interpolate(torch.randn(b, 3, 5, 5, generator=g), size=(size, size), mode="bicubic", align_corners=False)
    angle, freq = rand(b, 1, 1, 1) * math.pi, 4 + 12 * rand(b, 1, 1, 1)
    grating = torch.sin(freq * (X * torch.cos(angle) + Y * torch.sin(angle)) * math.pi)
    images = base + 0.12 * smooth + 0.06 * grating + 0.04 * torch.randn(b, 3, size, size, generator=g)
    masks = torch.zeros(b, size, size, dtype=torch.uint8)
    counts = 1 + (rand(b) * MAX_OBJECTS).long()  # 1..3 objects
    classes = (rand(b, MAX_OBJECTS) * len(CLASSES)).long()
    classes = torch.where(torch.arange(MAX_OBJECTS) < counts[:, None], classes, -1)
    for k in reversed(range(MAX_OBJECTS)):  # the main object (k = 0) last, on top
        centre = (rand(b, 2, 1, 1) - 0.5) * 1.2
        r = (0.4 + 0.25 * rand(b, 1, 1)) if k == 0 else (0.16 + 0.2 * rand(b, 1, 1))
        theta, aspect = rand(b, 1, 1) * 2 * math.pi, 0.5 + 0.5 * rand(b, 1, 1)
        dx, dy = X - centre[:, 0], Y - centre[:, 1]
        u, v = torch.cos(theta) * dx + torch.sin(theta) * dy, -torch.sin(theta) * dx + torch.cos(theta) * dy
        inside = _inside(classes[:, k].clamp_min(0), u, v, r, aspect) & (classes[:, k, None, None] >= 0)
        hue = (classes[:, k].clamp_min(0) + 0.3 * (rand(b) - 0.5)) / len(CLASSES)  # each class its own hue band
        colour = _hsv_to_rgb(hue, 0.65 + 0.35 * rand(b), 0.6 + 0.4 * rand(b))
        second = colour * (0.3 + 0.4 * rand(b, 1, 1, 1))  # the stripes: a darker shade
        stripe_freq, stripe_depth = 20 * rand(b, 1, 1, 1), 0.6 * rand(b, 1, 1, 1)
        stripes = 0.5 + 0.5 * torch.sin(stripe_freq * (u + 0.5 * v)[:, None] * math.pi)
        fill = colour + stripe_depth * stripes * (second - colour)
        images = torch.where(inside[:, None], fill, images)
        masks = torch.where(inside, k + 1, masks)
    return images.clamp(0, 1), masks, classes
