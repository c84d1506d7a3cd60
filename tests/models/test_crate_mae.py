"""crate_kernels.CRATEMAE against reference.crate_mae (upstream CRATE-MAE): loss, predictions, mask and every gradient
under the same random masking; state_dict both ways through the layout conversion; masking and reconstruction."""

import pytest
import torch

import crate_kernels
from crate_kernels import create_model
from crate_kernels.models import CRATEMAE
from crate_kernels.models.crate_mae import from_upstream_state_dict, sincos_pos_embed_2d, to_upstream_state_dict
from reference.crate_mae import MaskedAutoencoderCRATE, get_2d_sincos_pos_embed, mae_crate
from tests.models.helpers import assert_all_close, assert_exactly_close, outputs_and_grads, randomized
from tests.utils import seeded

BACKENDS = ["torch", "triton"]
DIM, DEPTH, HEADS = 32, 2, 2


def _pair(norm_pix_loss=False):
    ref = MaskedAutoencoderCRATE(
        img_size=8, patch_size=2, in_chans=1, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
        decoder_embed_dim=DIM, decoder_depth=DEPTH, decoder_num_heads=HEADS, norm_pix_loss=norm_pix_loss,
    )  # fmt: skip
    ref.load_state_dict(randomized(ref))
    ours = CRATEMAE(
        image_size=8, patch_size=2, channels=1, dim=DIM, depth=DEPTH, heads=HEADS, dim_head=DIM // HEADS,
        norm_pix_loss=norm_pix_loss,
    )  # fmt: skip
    ours.load_state_dict(from_upstream_state_dict(ref.state_dict()))
    return ours, ref


def _masked_run(model):
    """loss, predictions and mask as one vector, with the same masking noise for every model."""

    def run(images):
        torch.manual_seed(0)
        loss, pred, mask = model(images)
        return torch.cat([loss.reshape(1), pred.reshape(-1), mask.to(pred.dtype).reshape(-1)])

    return run


def _images(dtype=torch.float32):
    return torch.randn(3, 1, 8, 8, generator=seeded(0)).to(dtype)


@pytest.mark.parametrize("norm_pix_loss", [False, True], ids=["pixels", "norm_pix"])
def test_crate_mae_matches_reference_fp64(norm_pix_loss):
    crate_kernels.set_backend("torch")
    ours, ref = _pair(norm_pix_loss)
    ours.double(), ref.double()
    images = _images(torch.float64)
    expected = outputs_and_grads(_masked_run(ref), images, params_of=ref, rename=_ours_name)
    assert_exactly_close(outputs_and_grads(_masked_run(ours), images, params_of=ours), expected, atol=1e-10)


def _ours_name(upstream_name: str) -> str:
    return next(iter(from_upstream_state_dict({upstream_name: None})))


@pytest.mark.parametrize("backend", BACKENDS)
def test_crate_mae_forward_backward_matches_reference(backend):
    crate_kernels.set_backend(backend)
    ours, ref = _pair()
    images = _images()
    low = outputs_and_grads(_masked_run(ref), images, params_of=ref, rename=_ours_name) if backend != "torch" else None
    actual = outputs_and_grads(_masked_run(ours), images, params_of=ours)
    ref.double()
    expected = outputs_and_grads(_masked_run(ref), images.double(), params_of=ref, rename=_ours_name)
    assert_all_close(actual, expected, low)


def test_crate_mae_state_dict_round_trips_with_reference():
    ours, ref = _pair()
    assert list(to_upstream_state_dict(ours.state_dict())) == list(ref.state_dict())
    back = MaskedAutoencoderCRATE(
        img_size=8, patch_size=2, in_chans=1, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
        decoder_embed_dim=DIM, decoder_depth=DEPTH, decoder_num_heads=HEADS,
    )  # fmt: skip
    back.load_state_dict(to_upstream_state_dict(ours.state_dict()))  # strict
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    layer = ours.decoder.layers[0]
    assert isinstance(layer[1].fn, crate_kernels.MSSA) and layer[0].fn.weight.shape == (DIM, DIM)


def test_crate_mae_fixed_embeddings_are_upstreams_sincos():
    ours = CRATEMAE(image_size=8, patch_size=2, channels=1, dim=DIM, depth=1, heads=HEADS, dim_head=16)
    expected = get_2d_sincos_pos_embed(DIM, 4, cls_token=True).float()[None]
    torch.testing.assert_close(ours.decoder_pos_embed, expected, rtol=0, atol=1e-6)
    assert not ours.pos_embed.requires_grad and not ours.decoder_pos_embed.requires_grad
    assert not any(p.requires_grad for p in ours.decoder_embed.parameters())  # unused upstream: frozen, no DDP error
    assert sincos_pos_embed_2d(DIM, 2, 4).shape == (1 + 8, DIM)


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large"])
def test_crate_mae_presets_match_upstream(size):
    with torch.device("meta"):
        ref = mae_crate(size)
        ours = create_model(f"crate_mae_{size}_patch16_224")
    shapes = {k: v.shape for k, v in to_upstream_state_dict(ours.state_dict()).items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}


def test_crate_mae_masking_and_reconstruction():
    crate_kernels.set_backend("torch")
    model = create_model("crate_mae_demo")
    images = torch.rand(2, 1, 8, 8, generator=seeded(0))
    noise = torch.rand(2, 16, generator=seeded(1))
    loss, pred, mask = model(images, mask_ratio=0.75, noise=noise)
    assert pred.shape == (2, 16, 4) and loss.shape == ()
    assert mask.sum(dim=1).tolist() == [12, 12]  # L − int(L·0.25) masked per sample
    torch.testing.assert_close(mask, (noise.argsort(1).argsort(1) >= 4).float())  # the smallest noise is kept
    recon = model.reconstruct(images, mask_ratio=0.75, noise=noise)
    patches, recon_patches = model.patchify(images), model.patchify(recon)
    visible = ~mask.bool()
    assert torch.equal(recon_patches[visible], patches[visible])
    torch.testing.assert_close(recon_patches[~visible], pred[~visible])
    torch.testing.assert_close(model.unpatchify(patches), images, rtol=0, atol=0)


def test_crate_mae_hooks_and_fine_tuning_head():
    crate_kernels.set_backend("torch")
    model = create_model("crate_mae_demo")
    images = torch.rand(2, 1, 8, 8, generator=seeded(0))
    features = model.forward_features(images)
    assert features.shape == (2, 17, 64)
    assert model.forward_head(features, pre_logits=True).shape == (2, 64)
    with pytest.raises(ValueError, match="num_classes > 0"):
        model.forward_head(features)
    model.reset_classifier(10)
    assert model.forward_head(features).shape == (2, 10)
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()
    assert "mlp_head.1.weight" not in create_model("crate_mae_demo").state_dict()
    assert create_model("crate_mae_demo", num_classes=10).forward_head(features).shape == (2, 10)


def test_crate_mae_grad_checkpointing_gives_the_same_gradients():
    crate_kernels.set_backend("torch")
    ours, _ = _pair()
    ours.double()
    images = _images(torch.float64)
    plain = outputs_and_grads(_masked_run(ours), images, params_of=ours)
    ours.set_grad_checkpointing()
    assert ours.decoder.grad_checkpointing
    assert_exactly_close(outputs_and_grads(_masked_run(ours), images, params_of=ours), plain, atol=1e-12)


def test_crate_mae_rejects_bad_masks():
    model = create_model("crate_mae_demo", depth=1)
    images = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"mask_ratio must lie in \[0, 1\]"):
        model(images, mask_ratio=1.5)
    with pytest.raises(ValueError, match="masks none"):
        model(images, mask_ratio=0.0)
    with pytest.raises(ValueError, match=r"noise must have shape \(B, L\) = \(2, 16\)"):
        model(images, noise=torch.rand(2, 15))
