"""The ViT baseline: its layer equation written out by hand, and the classifier interface CRATE's classifiers have."""

import pytest
import torch
import torch.nn.functional as F

from crate_kernels import ViT, create_model
from tests.models.helpers import assert_exactly_close, outputs_and_grads
from tests.utils import seeded

TINY = {"image_size": 8, "patch_size": 2, "num_classes": 5, "dim": 32, "depth": 2, "heads": 2, "dim_head": 16}


def _images(batch=2, dtype=torch.float64):
    return torch.randn(batch, 3, 8, 8, generator=seeded(0), dtype=dtype)


def test_vit_layer_is_prenorm_attention_then_prenorm_mlp():
    torch.manual_seed(0)
    model = ViT(**TINY).double().eval()
    images = _images()
    x = torch.cat((model.cls_token.expand(2, -1, -1), model.to_patch_embedding(images)), 1) + model.pos_embedding
    for attn, ff in model.transformer.layers:
        a, m = attn.fn, ff.fn
        y = F.layer_norm(x, (32,), attn.norm.weight, attn.norm.bias, 1e-6)
        split = lambda t: t.view(2, 17, 2, 16).transpose(1, 2)  # noqa: E731
        q, k, v = split(a.q(y)), split(a.k(y)), split(a.v(y))
        o = torch.softmax(q @ k.mT / 4.0, dim=-1) @ v
        x = x + a.proj(o.transpose(1, 2).reshape(2, 17, 32))
        y = F.layer_norm(x, (32,), ff.norm.weight, ff.norm.bias, 1e-6)
        x = x + m[3](F.gelu(m[0](y)))
    logits = model.mlp_head(x[:, 0])
    assert_exactly_close({"out": model(images)}, {"out": logits}, atol=1e-12)


def test_vit_classifier_hooks_and_grad_checkpointing():
    model = ViT(**TINY).double()
    images = _images()
    features = model.forward_features(images)
    assert features.shape == (2, 17, 32)
    torch.testing.assert_close(model.forward_head(features), model(images))
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()
    plain = outputs_and_grads(model, images)
    model.set_grad_checkpointing()
    assert_exactly_close(outputs_and_grads(model, images), plain, atol=1e-12)
    model.reset_classifier(3)
    assert model.double()(images).shape == (2, 3)


def test_vit_rejects_bad_configs_and_images():
    with pytest.raises(ValueError, match="divisible"):
        ViT(**{**TINY, "image_size": 9})
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, H, W\)"):
        ViT(**TINY)(torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large"])
def test_vit_presets_match_the_crate_presets(size):
    with torch.device("meta"):
        vit, crate = create_model(f"vit_{size}_patch16_224"), create_model(f"crate_{size}_patch16_224")
    assert vit.pos_embedding.shape == crate.pos_embedding.shape
    assert len(vit.transformer.layers) == len(crate.transformer.layers)
    assert vit.transformer.layers[0][0].fn.heads == crate.transformer.layers[0][0].fn.heads
    assert vit.transformer.layers[0][1].fn[0].out_features == 4 * vit.transformer.dim
