"""crate_kernels.CRATE against reference.crate.CRATE: fp64 equality, state_dict both ways, presets, hooks, compile."""

import pytest
import torch

import crate_kernels
import reference.crate as upstream
from crate_kernels import CRATE, create_model
from tests.models.helpers import assert_all_close, assert_exactly_close, outputs_and_grads, randomized
from tests.utils import seeded

BACKENDS = ["torch", "triton"]
TINY = {"image_size": 8, "patch_size": 2, "num_classes": 5, "dim": 32, "depth": 2, "heads": 2, "dim_head": 16}


def _pair(**overrides):
    config = {**TINY, "channels": 1, **overrides}
    ref = upstream.CRATE(**config)
    ref.load_state_dict(randomized(ref))
    ours = CRATE(**config)
    ours.load_state_dict(ref.state_dict())
    return ours, ref, config


def _images(config, batch=2, dtype=torch.float32):
    size = config["image_size"]
    return torch.randn(batch, config["channels"], size, size, generator=seeded(0)).to(dtype)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_crate_matches_reference_fp64(pool):
    crate_kernels.set_backend("torch")
    ours, ref, config = _pair(pool=pool, ista=0.2)
    images = _images(config, dtype=torch.float64)
    expected = outputs_and_grads(ref.double(), images)
    assert_exactly_close(outputs_and_grads(ours.double(), images), expected, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_crate_forward_backward_matches_reference(backend):
    crate_kernels.set_backend(backend)
    ours, ref, config = _pair()
    images = _images(config)
    low = outputs_and_grads(ref, images) if backend != "torch" else None
    assert_all_close(outputs_and_grads(ours, images), outputs_and_grads(ref.double(), images.double()), low)


def test_crate_state_dict_round_trips_with_reference():
    ours, ref, config = _pair()
    assert list(ours.state_dict()) == list(ref.state_dict())
    back = upstream.CRATE(**config)
    back.load_state_dict(CRATE(**config).state_dict())  # strict, both directions
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


PRESETS = {"tiny": upstream.CRATE_tiny, "small": upstream.CRATE_small, "base": upstream.CRATE_base,
           "large": upstream.CRATE_large}  # fmt: skip


@pytest.mark.parametrize("size", PRESETS)
def test_crate_presets_have_upstream_keys_and_parameter_counts(size):
    with torch.device("meta"):
        ref = PRESETS[size]()
        ours = create_model(f"crate_{size}_patch16_224")
        patch8 = create_model(f"crate_{size}_patch8_224")
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert patch8.pos_embedding.shape[1] == 28 * 28 + 1 and patch8.to_patch_embedding[2].in_features == 3 * 8 * 8
    assert ours.transformer.layers[0][0].fn.heads == ref.transformer.layers[0][0].fn.heads


def test_crate_hooks():
    crate_kernels.set_backend("torch")
    ours, _, config = _pair()
    images = _images(config)
    features = ours.forward_features(images)
    assert features.shape == (2, 1 + 16, 32)
    torch.testing.assert_close(ours.forward_head(features), ours(images))
    torch.testing.assert_close(ours.forward_head(features, pre_logits=True), features[:, 0])
    assert ours.no_weight_decay() <= dict(ours.named_parameters()).keys()
    ours.reset_classifier(3)
    assert ours(images).shape == (2, 3) and ours.num_classes == 3
    ours.reset_classifier(0)
    assert ours(images).shape == (2, 32)
    with pytest.raises(ValueError, match="num_classes"):
        ours.reset_classifier(-1)


def test_crate_grad_checkpointing_gives_the_same_gradients():
    crate_kernels.set_backend("torch")
    ours, _, config = _pair()
    images = _images(config, dtype=torch.float64)
    ours.double()
    plain = outputs_and_grads(ours, images)
    ours.set_grad_checkpointing()
    assert_exactly_close(outputs_and_grads(ours, images), plain, atol=1e-12)


def test_crate_rejects_bad_configs_and_images():
    with pytest.raises(ValueError, match="divisible"):
        CRATE(**{**TINY, "image_size": 9})
    with pytest.raises(ValueError, match="pool"):
        CRATE(**TINY, pool="max")
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 8, 8\)"):
        CRATE(**TINY)(torch.randn(2, 1, 8, 8))


def test_crate_compiles_fullgraph():
    crate_kernels.set_backend("torch")
    model = create_model("crate_demo", depth=1)
    images = torch.randn(2, 1, 8, 8, generator=seeded(0))
    # aot_eager: Dynamo must capture one graph and AOTAutograd trace the backward; Inductor's C++ build adds ~40 s of
    # CPU time here and checks nothing about the model.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(images), model(images))
    compiled(images).sum().backward()
    assert model.transformer.layers[0][1].fn.weight.grad is not None
