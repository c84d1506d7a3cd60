"""The classifiers CRATE and CRATEAlpha against their upstream definitions in reference/: fp64 equality, state_dict
both ways, both backends, presets, hooks, gradient checkpointing, torch.compile."""

import math

import pytest
import torch

import crate_kernels
import reference.crate
import reference.crate_alpha
from crate_kernels import CRATE, create_model
from crate_kernels.models import CRATEAlpha
from tests.models.helpers import assert_all_close, assert_exactly_close, outputs_and_grads, randomized
from tests.utils import BACKENDS, seeded

TINY = {"image_size": 8, "patch_size": 2, "num_classes": 5, "dim": 32, "depth": 2, "heads": 2, "dim_head": 16}
# family -> (our class, upstream class, upstream presets by our size name)
FAMILIES = {
    "crate": (CRATE, reference.crate.CRATE),
    "crate_alpha": (CRATEAlpha, reference.crate_alpha.CRATE),
}


def _pair(family, **overrides):
    ours_cls, ref_cls = FAMILIES[family]
    config = {**TINY, "channels": 1, **overrides}
    ref = ref_cls(**config)
    ref.load_state_dict(randomized(ref))
    ours = ours_cls(**config)
    ours.load_state_dict(ref.state_dict())
    return ours, ref, config


def _images(config, batch=2, dtype=torch.float32):
    size = config["image_size"]
    return torch.randn(batch, config["channels"], size, size, generator=seeded(0)).to(dtype)


@pytest.mark.parametrize(
    ("family", "overrides"),
    [("crate", {}), ("crate", {"pool": "mean", "ista": 0.2}), ("crate_alpha", {})],
    ids=["crate", "crate-mean-ista0.2", "crate_alpha"],
)
def test_classifier_matches_reference_fp64(family, overrides):
    crate_kernels.set_backend("torch")
    ours, ref, config = _pair(family, **overrides)
    images = _images(config, dtype=torch.float64)
    expected = outputs_and_grads(ref.double(), images)
    assert_exactly_close(outputs_and_grads(ours.double(), images), expected, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_forward_backward_matches_reference(family, backend):
    crate_kernels.set_backend(backend)
    ours, ref, config = _pair(family)
    images = _images(config)
    low = outputs_and_grads(ref, images) if backend != "torch" else None
    assert_all_close(outputs_and_grads(ours, images), outputs_and_grads(ref.double(), images.double()), low)


@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_state_dict_round_trips_with_reference(family):
    ours, ref, config = _pair(family)
    assert list(ours.state_dict()) == list(ref.state_dict())
    back = FAMILIES[family][1](**config)
    back.load_state_dict(FAMILIES[family][0](**config).state_dict())  # strict, the other direction
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_crate_alpha_layout():
    ours, _, _ = _pair("crate_alpha")
    attn, ista = ours.transformer.layers[0]
    assert attn.norm.eps == ista.norm.eps == 1e-6 and ours.mlp_head[0].eps == 1e-5
    assert attn.fn.to_out[0].bias is None and ista.fn.D.shape == ista.fn.D1.shape == (32, 128)
    assert ours.conv1.bias is not None


# name -> upstream constructor of the same model (vanilla: reference/crate.py presets; CRATE-α: its torch presets,
# S/16 from upstream's width table).
PRESETS = {
    "crate_tiny_patch16_224": reference.crate.CRATE_tiny,
    "crate_small_patch16_224": reference.crate.CRATE_small,
    "crate_base_patch16_224": reference.crate.CRATE_base,
    "crate_large_patch16_224": reference.crate.CRATE_large,
    "crate_alpha_small_patch16_224": lambda: reference.crate_alpha.CRATE(
        image_size=224, patch_size=16, num_classes=1000, dim=576, depth=12, heads=12, dim_head=48
    ),
    "crate_alpha_base_patch16_224": reference.crate_alpha.CRATE_base,
    "crate_alpha_large_patch14_224": reference.crate_alpha.CRATE_large,
}


@pytest.mark.parametrize("name", PRESETS)
def test_presets_have_upstream_keys_shapes_and_parameter_counts(name):
    with torch.device("meta"):
        ref = PRESETS[name]()
        ours = create_model(name)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large"])
def test_crate_patch8_presets(size):
    with torch.device("meta"):
        patch16, patch8 = create_model(f"crate_{size}_patch16_224"), create_model(f"crate_{size}_patch8_224")
    assert patch8.pos_embedding.shape[1] == 28 * 28 + 1 and patch8.to_patch_embedding[2].in_features == 3 * 8 * 8
    assert patch8.transformer.layers[0][0].fn.heads == patch16.transformer.layers[0][0].fn.heads


@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_hooks(family):
    crate_kernels.set_backend("torch")
    ours, _, config = _pair(family)
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


@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_grad_checkpointing_gives_the_same_gradients(family):
    crate_kernels.set_backend("torch")
    ours, _, config = _pair(family)
    images = _images(config, dtype=torch.float64)
    ours.double()
    plain = outputs_and_grads(ours, images)
    ours.set_grad_checkpointing()
    assert_exactly_close(outputs_and_grads(ours, images), plain, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_rejects_bad_configs_and_images(family):
    cls = FAMILIES[family][0]
    with pytest.raises(ValueError, match="divisible"):
        cls(**{**TINY, "image_size": 9})
    with pytest.raises(ValueError, match="pool"):
        cls(**TINY, pool="max")
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, H, W\)"):
        cls(**TINY)(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"multiples of the patch size \(2, 2\), got \(2, 3, 8, 9\)"):
        cls(**TINY)(torch.randn(2, 3, 8, 9))


@pytest.mark.parametrize("name", ["crate_demo", "crate_alpha_demo"])
def test_classifier_compiles_fullgraph(name):
    crate_kernels.set_backend("torch")
    model = create_model(name, depth=1)
    images = torch.randn(2, 1, 8, 8, generator=seeded(0))
    # aot_eager: Dynamo must capture one graph and AOTAutograd trace the backward; Inductor's C++ build adds ~40 s of
    # CPU time here and checks nothing about the model.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(images), model(images))
    compiled(images).sum().backward()
    assert all(p.grad is not None for p in model.transformer.parameters())
    small = images[:, :, :4, :6]  # another patch grid: the interpolated positions compile too
    torch.testing.assert_close(compiled(small), model(small))


def _bicubic_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D cubic convolution (a = −0.75, half-pixel centres, border indices clamped)."""
    a, m = -0.75, torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for j in range(base - 1, base + 3):
            x = abs(src - j)
            w = ((a + 2) * x - (a + 3)) * x * x + 1 if x <= 1 else ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
            m[i, min(max(j, 0), n_in - 1)] += w
    return m


@pytest.mark.parametrize("name", ["crate_demo", "crate_alpha_demo", "vit_demo"])
def test_classifier_takes_other_image_sizes(name):
    """Native size: ``pos_embedding`` itself; another multiple of the patch size: its patch part resized bicubically
    (checked against a separable cubic convolution written here), the [CLS] position kept, gradients reaching it."""
    crate_kernels.set_backend("torch")
    model = create_model(name, depth=1, image_size=(8, 6))  # a (4, 3) grid of 2 × 2 patches
    assert model.positions((4, 3)) is model.pos_embedding
    table = model.pos_embedding.detach().double()
    grid = table[0, 1:].reshape(4, 3, -1)
    expected = torch.einsum("ah,hwd,bw->abd", _bicubic_matrix(6, 4), grid, _bicubic_matrix(2, 3)).reshape(12, -1)
    resized = model.positions((6, 2))
    assert resized.shape == (1, 13, table.shape[2]) and torch.equal(resized[0, 0], model.pos_embedding[0, 0])
    torch.testing.assert_close(resized[0, 1:].double(), expected, rtol=1e-5, atol=1e-5)
    images = torch.randn(3, 1, 12, 4, generator=seeded(0))
    model(images).square().sum().backward()
    assert model.pos_embedding.grad[0, 1:].abs().amax(1).gt(0).all()  # every patch position gets a gradient
    assert model.pos_embedding.grad[0, 0].abs().amax() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_trains_under_autocast(family):
    """bf16 autocast (the training loop's mixed precision): every op takes consistent dtypes, gradients reach every
    parameter in fp32, and the logits stay within bf16 error of the fp32 model's."""
    crate_kernels.set_backend("torch")
    ours, _, config = _pair(family)
    images = _images(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = ours(images)
    logits.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters())
    torch.testing.assert_close(logits.float(), ours(images), atol=5e-2, rtol=5e-2)
