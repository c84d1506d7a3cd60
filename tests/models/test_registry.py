"""create_model / list_models: the contract's names, overrides, and clear errors."""

import pytest
import torch

import crate_kernels
from crate_kernels import create_model, list_models

VANILLA = [f"crate_{s}_patch{p}_224" for s in ("tiny", "small", "base", "large") for p in (16, 8)]
DEMOS = ["crate_demo", "crate_alpha_demo", "crate_mae_demo", "crate_lm_demo", "crate_mlm_demo"]
ALPHA = ["crate_alpha_small_patch16_224", "crate_alpha_base_patch16_224", "crate_alpha_large_patch14_224"]
MAE = [f"crate_mae_{s}_patch16_224" for s in ("tiny", "small", "base", "large")]
TEXT = ["crate_lm_small", "crate_lm_base", "crate_mlm_small", "crate_mlm_base"]
VIT = [f"vit_{s}_patch{p}_224" for s in ("tiny", "small", "base", "large") for p in (16, 8)] + ["vit_demo"]


def test_contract_names_are_registered():
    assert set(VANILLA + ALPHA + MAE + TEXT + DEMOS + VIT) == set(list_models())
    assert list_models() == sorted(list_models())


def test_list_models_filters_with_fnmatch():
    assert list_models("crate_*_patch8_224") == sorted(n for n in VANILLA if n.endswith("patch8_224"))
    assert list_models("no_such_*") == []


@pytest.mark.parametrize("name", sorted(list_models()))
def test_every_registered_model_builds(name):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert model.config["name"] == name


def test_demo_sizes():
    model = create_model("crate_demo")
    assert (model.channels, model.image_size, model.patch_size, model.num_classes) == (1, 8, 2, 10)
    assert len(model.transformer.layers) == 4
    mssa = model.transformer.layers[0][0].fn
    assert (mssa.heads, mssa.dim_head, mssa.qkv.in_features) == (4, 16, 64)


def test_overrides_replace_constructor_arguments():
    model = create_model("crate_demo", num_classes=3, depth=2, dim=32, heads=2, dim_head=8, pool="mean")
    assert len(model.transformer.layers) == 2 and model.pool == "mean"
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    changed = {"num_classes": 3, "depth": 2, "dim": 32, "heads": 2, "dim_head": 8, "pool": "mean"}
    assert model.config == {**crate_kernels.models.model_config("crate_demo"), "name": "crate_demo", **changed}
    assert create_model("crate_demo", image_size=(8, 16)).pos_embedding.shape == (1, 1 + 4 * 8, 64)


def test_unknown_name_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"unknown model name 'crate_tiny_patch16'.*did you mean 'crate_tiny_patch16_224'"
    ):
        create_model("crate_tiny_patch16")
    with pytest.raises(ValueError, match="list_models"):
        create_model("resnet50")


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"depht": 2}, TypeError, r"takes no argument\(s\) \['depht'\]"),
        ({"depth": 0}, ValueError, "depth must be a positive int"),
        ({"dim": 64.0}, ValueError, "dim must be a positive int"),
        ({"image_size": (8, 0)}, ValueError, "image_size must be a positive int"),
        ({"dropout": -0.1}, ValueError, "dropout must be a non-negative number"),
        ({"pool": 1}, TypeError, "pool must be a str"),
        ({"pool": "max"}, ValueError, "pool must be 'cls'"),
    ],
)
def test_bad_overrides_are_clear_errors(overrides, error, message):
    with pytest.raises(error, match=message):
        create_model("crate_demo", **overrides)
