"""load_official on synthetic upstream containers and broken files; save_pretrained / from_pretrained round trips."""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

import crate_kernels
from crate_kernels import create_model, from_pretrained, load_official, save_pretrained
from reference import crate as ref_crate
from tests.utils import seeded

# crate_demo's sizes (the model API contract), as upstream's CRATE class takes them
DEMO = dict(image_size=8, patch_size=2, num_classes=10, dim=64, depth=4, heads=4, channels=1, dim_head=16)


def _upstream_demo() -> ref_crate.CRATE:
    torch.manual_seed(1)
    return ref_crate.CRATE(**DEMO)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == snapshot.keys()
    assert all(torch.equal(now[k], snapshot[k]) for k in now), "the model was changed by a failed load"


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: sd, id="bare"),
        pytest.param(lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, id="ma-lab"),
        pytest.param(lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": []}}, id="model"),
        pytest.param(lambda sd: {"model": {f"_orig_mod.module.{k}": v for k, v in sd.items()}}, id="compiled-ddp"),
    ],
)
def test_load_official_vanilla_containers_give_upstream_outputs(tmp_path, wrap):
    crate_kernels.set_backend("torch")
    upstream = _upstream_demo()
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(wrap(upstream.state_dict()), path)
    model = create_model("crate_demo")
    report = load_official(model, path)
    assert report.layout == "crate_kernels" and report.num_tensors == len(upstream.state_dict())
    images = torch.rand(3, 1, 8, 8, generator=seeded(0))
    with torch.no_grad():
        torch.testing.assert_close(model.double()(images.double()), upstream.double()(images.double()))


def test_load_official_accepts_an_in_memory_container():
    upstream = _upstream_demo()
    model = create_model("crate_demo")
    load_official(model, {"state_dict": {f"module.{k}": v for k, v in upstream.state_dict().items()}})
    assert torch.equal(model.transformer.layers[3][1].fn.weight, upstream.transformer.layers[3][1].fn.weight)


def _checkpoint_with(tmp_path, edit) -> str:
    sd = dict(_upstream_demo().state_dict())
    edit(sd)
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": sd}, path)
    return str(path)


def test_load_official_reports_every_mismatch_and_changes_nothing(tmp_path):
    def edit(sd):
        del sd["transformer.layers.2.1.fn.weight"]
        sd["transformer.layers.9.0.fn.qkv.weight"] = torch.zeros(64, 64)
        sd["mlp_head.1.weight"] = torch.zeros(7, 64)

    model = create_model("crate_demo")
    before = _snapshot(model)
    with pytest.raises(ValueError, match="nothing was loaded") as info:
        load_official(model, _checkpoint_with(tmp_path, edit))
    message = str(info.value)
    assert "missing from the checkpoint (1):\n    transformer.layers.2.1.fn.weight" in message
    assert "unexpected in the checkpoint (1):\n    transformer.layers.9.0.fn.qkv.weight" in message
    assert "mlp_head.1.weight: (7, 64) vs (10, 64)" in message
    _assert_unchanged(model, before)


@pytest.mark.parametrize("kind", ["garbage", "tiny", "truncated", "empty"])
def test_load_official_corrupted_files_raise_clearly(tmp_path, kind):
    good = tmp_path / "good.pth"
    torch.save(_upstream_demo().state_dict(), good)
    data = {
        "garbage": b"not a checkpoint at all" * 10,
        "tiny": b"abc",
        "truncated": good.read_bytes()[:2000],
        "empty": b"",
    }[kind]
    bad = tmp_path / "bad.pth"
    bad.write_bytes(data)
    model = create_model("crate_demo")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"cannot read .*bad\.pth.* with torch\.load\(weights_only=True\)"):
        load_official(model, bad)
    _assert_unchanged(model, before)


def test_load_official_refuses_pickled_objects_and_odd_containers(tmp_path):
    path = tmp_path / "with_args.pth"
    torch.save({"state_dict": _upstream_demo().state_dict(), "args": argparse.Namespace(lr=1.0)}, path)
    model = create_model("crate_demo")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_official(model, path)
    with pytest.raises(ValueError, match=r"no state dict: expected a mapping of tensors .* got keys \['epoch'"):
        load_official(model, {"epoch": 3, "weights": [1, 2]})
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_official(model, tmp_path / "missing.pth")
    with pytest.raises(TypeError, match="path_or_state_dict must be a path or a mapping"):
        load_official(model, 3)


def test_load_official_interpolates_position_embeddings(tmp_path):
    source = create_model("crate_demo")  # 8×8 images, patch 2: a 4×4 grid
    target = create_model("crate_demo", image_size=12)  # a 6×6 grid
    report = load_official(target, source.state_dict())
    assert report.interpolated == {"pos_embedding": ((1, 17, 64), (1, 37, 64))}
    pe_src, pe_dst = source.pos_embedding.detach(), target.pos_embedding.detach()
    assert torch.equal(pe_dst[:, 0], pe_src[:, 0]), "the class token's embedding must be kept"
    grid = pe_src[0, 1:].reshape(4, 4, 64).permute(2, 0, 1)[None]  # row-major patches -> (1, D, 4, 4)
    resized = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    torch.testing.assert_close(pe_dst[0, 1:], resized.reshape(36, 64))
    with pytest.raises(ValueError, match=r"pos_embedding: \(1, 17, 64\) vs \(1, 37, 64\)"):
        load_official(create_model("crate_demo", image_size=12), source.state_dict(), interpolate=False)


def test_save_and_from_pretrained_round_trip(tmp_path):
    crate_kernels.set_backend("torch")
    model = create_model("crate_demo", depth=2, num_classes=7, image_size=(8, 12))
    folder = save_pretrained(model, tmp_path / "demo")
    config = json.loads((folder / "config.json").read_text())
    assert config == {"name": "crate_demo", "overrides": {"depth": 2, "num_classes": 7, "image_size": [8, 12]}}
    loaded = from_pretrained(folder)
    assert type(loaded) is type(model) and loaded.config == model.config
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )
    images = torch.rand(2, 1, 8, 12, generator=seeded(3))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), model.eval()(images))


def test_save_pretrained_refuses_models_its_config_cannot_rebuild(tmp_path):
    model = create_model("crate_demo", depth=1)
    model.reset_classifier(3)
    with pytest.raises(ValueError, match="no longer describes this model"):
        save_pretrained(model, tmp_path / "x")
    with pytest.raises(ValueError, match=r"built by crate_kernels\.create_model"):
        save_pretrained(ref_crate.CRATE(**DEMO), tmp_path / "y")
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        from_pretrained(tmp_path / "nowhere")
