"""load_official on synthetic upstream containers and broken files; save_pretrained / from_pretrained round trips."""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

import crate_kernels
from crate_kernels import create_model, from_pretrained, load_official, save_pretrained
from crate_kernels.models.crate_mae import sincos_pos_embed_2d
from reference import crate as ref_crate
from reference import crate_alpha as ref_crate_alpha
from reference import crate_lm as ref_crate_lm
from reference.crate_mae import MaskedAutoencoderCRATE, get_2d_sincos_pos_embed
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


def test_load_official_crate_alpha_pth_gives_upstream_outputs(tmp_path):
    """CRATE-α's official torch checkpoints are bare state dicts of its torch_inference model."""
    crate_kernels.set_backend("torch")
    torch.manual_seed(2)
    upstream = ref_crate_alpha.CRATE(**DEMO)
    path = tmp_path / "crate_alpha_demo.pth"
    torch.save(upstream.state_dict(), path)
    model = create_model("crate_alpha_demo")
    assert load_official(model, path).num_tensors == len(upstream.state_dict())
    images = torch.rand(2, 1, 8, 8, generator=seeded(1), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.double()(images), upstream.double()(images))


def test_load_official_crate_mae_checkpoint_maps_upstream_blocks(tmp_path):
    """Upstream CRATE-MAE saves {"model": ...} with each layer in its own block (blocks.{i}.layers.0.*)."""
    torch.manual_seed(3)
    upstream = MaskedAutoencoderCRATE(
        img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=4, num_heads=4,
        decoder_embed_dim=64, decoder_depth=4, decoder_num_heads=4,
    )  # fmt: skip
    path = tmp_path / "crate_mae.pth"
    torch.save({"model": upstream.state_dict(), "epoch": 9}, path)
    model = create_model("crate_mae_demo")
    assert load_official(model, path).layout == "crate-mae"
    assert torch.equal(model.transformer.layers[2][1].fn.weight, upstream.blocks[2].layers[0][1].fn.weight)
    assert torch.equal(model.decoder.layers[3][0].fn.weight, upstream.decoder_blocks[3].layers[0][0].fn.weight)


def _upstream_lm_demo() -> ref_crate_lm.CRATE:
    """crate-lm's model at crate_lm_demo's sizes."""
    torch.manual_seed(4)
    lm = create_model("crate_lm_demo")
    config = ref_crate_lm.CRATEConfig(
        block_size=lm.block_size, vocab_size=lm.vocab_size, n_layer=lm.config["depth"], n_head=lm.config["heads"],
        n_embd=lm.config["dim"],
    )  # fmt: skip
    return ref_crate_lm.CRATE(config)


def test_load_official_crate_lm_nanogpt_checkpoint(tmp_path):
    """crate-lm's train.py saves nanoGPT's {"model", "optimizer", "model_args", "iter_num", ...}, keys prefixed with
    _orig_mod. when the model was compiled; the unembedding is tied to the token embedding."""
    crate_kernels.set_backend("torch")
    upstream = _upstream_lm_demo()
    state = {f"_orig_mod.{k}": v for k, v in upstream.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "model_args": {"n_layer": 4}, "iter_num": 100, "best_val_loss": 1.5}, path)
    model = create_model("crate_lm_demo")
    assert load_official(model, path).layout == "crate-lm"
    assert model.lm_head.weight is model.wte.weight, "loading must keep the embedding tied"
    idx = torch.randint(model.vocab_size, (2, 9), generator=seeded(5))
    with torch.no_grad():
        expected = upstream.double()(idx, targets=idx)[0]  # upstream gives every position's logits with targets
        torch.testing.assert_close(model.double()(idx), expected)


def test_save_and_from_pretrained_keep_tied_weights(tmp_path):
    model = create_model("crate_lm_demo", depth=1)
    loaded = from_pretrained(save_pretrained(model, tmp_path / "lm"))
    assert loaded.lm_head.weight is loaded.wte.weight
    assert torch.equal(loaded.wte.weight, model.wte.weight)


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


@pytest.mark.parametrize("image_size", [12, (8, 12)], ids=["6x6", "4x6"])
def test_load_official_regenerates_crate_mae_sincos_tables(image_size):
    """CRATE-MAE's position tables are fixed 2-D sin-cos functions of the grid (upstream never trains them): at
    another image size they are computed for the new grid, not resized; the learned tokens load as they are."""
    torch.manual_seed(3)
    upstream = MaskedAutoencoderCRATE(
        img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=1, num_heads=4,
        decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
    )  # fmt: skip
    model = create_model("crate_mae_demo", depth=1, image_size=image_size)
    report = load_official(model, upstream.state_dict())
    grid = (6, 6) if image_size == 12 else (4, 6)
    tokens = 1 + grid[0] * grid[1]
    assert report.regenerated == {k: ((1, 17, 64), (1, tokens, 64)) for k in ("decoder_pos_embed", "pos_embed")}
    assert report.interpolated == {} and "regenerated decoder_pos_embed" in str(report)
    expected = get_2d_sincos_pos_embed(64, 6, cls_token=True)[None] if grid == (6, 6) else None
    for table in (model.pos_embed, model.decoder_pos_embed):
        torch.testing.assert_close(table, sincos_pos_embed_2d(64, *grid)[None], rtol=0, atol=0)
        if expected is not None:  # upstream's own function (square grids only) agrees
            torch.testing.assert_close(table, expected.float(), rtol=0, atol=1e-6)
    assert torch.equal(model.mask_token, upstream.mask_token)


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


@pytest.mark.slow
def test_load_official_crate_small_checkpoint_layout_at_224_and_384():
    """An official CRATE-S/16 checkpoint's layout (upstream's CRATE_small, Ma-Lab's container) fits our preset, and
    resizes to 384² (a 24×24 grid) for fine-tuning at higher resolution."""
    crate_kernels.set_backend("torch")
    torch.manual_seed(5)
    upstream = ref_crate.CRATE_small()
    checkpoint = {"state_dict": {f"module.{k}": v for k, v in upstream.state_dict().items()}, "best_acc1": 0.0}
    model = create_model("crate_small_patch16_224")
    load_official(model, checkpoint)
    image = torch.rand(1, 3, 224, 224, generator=seeded(6))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(image), upstream.eval()(image), rtol=1e-4, atol=1e-4)
    report = load_official(create_model("crate_small_patch16_224", image_size=384), checkpoint)
    assert report.interpolated == {"pos_embedding": ((1, 197, 576), (1, 577, 576))}
