"""MaskCut and attention masks on constructed features and models, and the two scores."""

import pytest
import torch

import crate_kernels
from crate_kernels import segment
from tests.utils import seeded

E1, E2, E3 = torch.eye(3)


def _square(top: int, left: int, side: int, size: int = 16) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top : top + side, left : left + side] = True
    return mask


@pytest.mark.parametrize(("top", "side"), [(4, 5), (1, 14)], ids=["small", "larger-than-background"])
def test_ncut_masks_cuts_two_clean_clusters_exactly(top, side):
    square = _square(top, top, side)
    features = torch.where(square.flatten()[:, None], E1, E2)
    mask = segment.ncut_masks(features, (16, 16))
    assert mask.shape == (1, 16, 16) and float(segment.mask_iou(mask, square[None])) == 1.0


def test_ncut_masks_takes_two_objects_one_after_the_other():
    """An isolated object, and one whose corner patch is half background: the first cut takes the isolated one, the
    cut of the remaining patches the other."""
    a, b = _square(2, 2, 3), _square(8, 6, 5)
    features = torch.where(a[..., None], E1, torch.where(b[..., None], E2, E3))
    features[8, 6] = E2 + E3
    masks = segment.ncut_masks(features.view(-1, 3), (16, 16), num_objects=2)
    assert torch.equal(masks[0], a) and torch.equal(masks[1], b)


def test_ncut_masks_flips_a_cut_that_covers_the_border():
    frame = ~_square(3, 3, 10)  # the larger-magnitude side is the frame; it covers the whole border
    features = torch.where(frame.flatten()[:, None], E1, E2)
    assert torch.equal(segment.ncut_masks(features, (16, 16))[0], ~frame)


def test_attention_masks_keep_the_top_mass_per_head_and_their_union():
    crate_kernels.set_backend("torch")
    torch.manual_seed(0)
    model = crate_kernels.create_model("crate_demo", depth=1)
    images = torch.randn(2, 1, 8, 8, generator=seeded(0))
    maps = crate_kernels.measure.attention_maps(model, images).flatten(2)
    masks = segment.attention_masks(model, images, keep=0.6)
    heads = masks.heads.flatten(2)
    share = lambda kept: (maps * kept).sum(-1) / maps.sum(-1)  # noqa: E731
    assert (share(heads) >= 0.6 - 1e-6).all()
    smallest_kept = torch.where(heads, maps, torch.inf).amin(-1, keepdim=True)
    assert (share(heads & (maps > smallest_kept)) < 0.6).all()  # without its smallest patch, a mask holds < keep
    assert torch.equal(masks.union, masks.heads.any(1))


@pytest.mark.parametrize("name", ["crate_demo", "vit_demo"])
@pytest.mark.parametrize("method", ["maskcut", "attention"])
def test_segment_gives_pixel_masks(name, method):
    crate_kernels.set_backend("torch")
    model = crate_kernels.create_model(name, depth=1)
    masks = segment.segment(model, torch.randn(3, 1, 8, 8, generator=seeded(1)), method)
    assert masks.shape == (3, 8, 8) and masks.dtype == torch.bool
    assert torch.equal(masks[:, ::2, ::2].repeat_interleave(2, 1).repeat_interleave(2, 2), masks)  # whole patches


def test_mask_iou_and_corloc():
    truth = torch.zeros(2, 16, 16, dtype=torch.long)
    truth[:, 2:6, 2:6] = 1
    truth[:, 10:14, 9:15] = 2
    pred = torch.zeros(2, 16, 16, dtype=torch.bool)
    pred[0, 10:14, 9:14] = True  # box IoU 20/24 with object 2
    pred[1, 2:4, 2:4] = True  # box IoU 4/16 with object 1
    assert torch.equal(segment.corloc(pred, truth), torch.tensor([True, False]))
    torch.testing.assert_close(segment.mask_iou(pred, truth > 0), torch.tensor([20 / 40, 4 / 40]))
    assert not segment.corloc(torch.zeros_like(pred), truth).any()
    crate_kernels.set_backend("torch")
    with pytest.raises(ValueError, match="method"):
        segment.segment(crate_kernels.create_model("crate_demo", depth=1), torch.zeros(1, 1, 8, 8), "pca")
