"""``--data shapes``: drawn deterministically, masks that match the drawn objects, labels of the largest object."""

import math

import torch

from crate_kernels.train import shapes
from crate_kernels.train.config import DataConfig
from crate_kernels.train.data import load_dataset


def test_shapes_are_deterministic_by_seed_and_labelled_by_the_largest_object():
    a, b, c = shapes.generate(40, 32, seed=1), shapes.generate(40, 32, seed=1), shapes.generate(40, 32, seed=2)
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("images", "labels", "masks", "classes"))
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (40, 3, 32, 32) and a.images.min() >= 0 and a.images.max() <= 1
    objects = (a.classes >= 0).sum(1)
    assert objects.min() >= 1 and objects.max() <= shapes.MAX_OBJECTS and a.masks.max() <= objects.max()
    assert not (a.masks > objects[:, None, None]).any()  # no mask pixel of an object the image does not hold
    for i in range(40):
        areas = torch.stack([(a.masks[i] == k + 1).sum() for k in range(shapes.MAX_OBJECTS)])
        assert a.labels[i] == a.classes[i, areas.argmax()]


def test_shape_masks_have_the_drawn_geometry():
    """Each class's mask on a fine grid covers its analytic area (r = 1): ellipse π·aspect, triangle 3√3/4, square
    2, star (between its inner and outer circles), cross 2·2·0.6 − 0.6²."""
    n = 801
    axis = (torch.arange(n) + 0.5) / n * 4 - 2
    v, u = torch.meshgrid(axis, axis, indexing="ij")
    pixel = (4 / n) ** 2
    r, aspect = torch.ones(1, 1, 1), torch.full((1, 1, 1), 0.5)
    area = lambda c: float(shapes._inside(torch.tensor([c]), u[None], v[None], r, aspect).sum()) * pixel  # noqa: E731
    expected = [math.pi * 0.5, 3 * math.sqrt(3) / 4, 2.0, None, 2 * 2 * 0.6 - 0.6**2]
    for c, want in enumerate(expected):
        if want is not None:
            assert abs(area(c) - want) < 0.01 * want, shapes.CLASSES[c]
    assert math.pi * 0.45**2 < area(3) < math.pi


def test_shapes_data_set_carries_the_held_out_masks(monkeypatch):
    monkeypatch.setattr(shapes, "COUNT", 50)
    train, val = load_dataset(DataConfig(name="shapes", val_fraction=0.2, image_size=32), text=False)
    assert (len(train), len(val), val.num_classes) == (40, 10, len(shapes.CLASSES))
    assert val.masks.shape == (10, 32, 32) and train.masks.shape == (40, 32, 32)
    drawn = shapes.generate(50, 32)
    same = (drawn.images == val.images[0]).flatten(1).all(1)  # the drawn image held out first
    assert torch.equal(drawn.masks[same][0], val.masks[0])
