"""apply_crate_kernels / revert_crate_kernels: in-place swaps that share parameters and change no output or key."""

import pytest
import torch
from torch import nn

import crate_kernels
from crate_kernels import ISTA, MSSA, OvercompleteISTA, apply_crate_kernels, revert_crate_kernels
from reference import crate as ref_crate
from reference import crate_alpha as ref_crate_alpha
from reference import crate_lm as ref_crate_lm
from reference import crate_mae as ref_crate_mae
from reference.ista import FeedForward, OvercompleteISTABlock
from reference.mssa import Attention
from tests.utils import assert_close_to_ref, seeded


def _reference_model() -> ref_crate.CRATE:
    torch.manual_seed(0)
    return ref_crate.CRATE(image_size=8, patch_size=2, num_classes=10, dim=32, depth=3, heads=4, channels=1, dim_head=8)


def _params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=False))


def test_apply_then_revert_keeps_outputs_keys_and_parameters():
    crate_kernels.set_backend("torch")
    model = _reference_model().double().eval()
    images = torch.rand(2, 1, 8, 8, generator=seeded(0), dtype=torch.float64)
    originals = {path: m for path, m in model.named_modules()}
    before_params, before_keys = _params(model), list(model.state_dict())
    ptrs = {k: p.data_ptr() for k, p in before_params.items()}
    with torch.no_grad():
        expected = model(images)

    report = apply_crate_kernels(model)
    depth = len(model.transformer.layers)
    assert set(report.swapped) == {f"transformer.layers.{i}.{j}.fn" for i in range(depth) for j in (0, 1)}
    assert report.swapped["transformer.layers.0.0.fn"] == ("Attention", "MSSA")
    assert report.swapped["transformer.layers.2.1.fn"] == ("FeedForward", "ISTA")
    assert all(isinstance(layer[0].fn, MSSA) and isinstance(layer[1].fn, ISTA) for layer in model.transformer.layers)
    assert list(model.state_dict()) == before_keys
    after = _params(model)
    assert after.keys() == before_params.keys()
    assert all(after[k] is before_params[k] and after[k].data_ptr() == ptrs[k] for k in after), "parameters copied"
    with torch.no_grad():
        fused = model(images)
    assert_close_to_ref("patched model output", fused, expected)  # fp64 ceilings: 1e-10

    back = revert_crate_kernels(model)
    assert set(back.swapped) == set(report.swapped)
    assert all(m is originals[path] for path, m in model.named_modules()), "original module objects not restored"
    assert list(model.state_dict()) == before_keys
    with torch.no_grad():
        assert torch.equal(model(images), expected)


def test_apply_trains_the_original_parameters():
    crate_kernels.set_backend("torch")
    model = _reference_model()
    ista_weight = model.transformer.layers[1][1].fn.weight
    qkv_weight = model.transformer.layers[1][0].fn.qkv.weight
    apply_crate_kernels(model)
    model(torch.rand(2, 1, 8, 8, generator=seeded(1))).square().sum().backward()
    assert ista_weight.grad is not None and ista_weight.grad.abs().sum() > 0
    assert qkv_weight.grad is not None and qkv_weight.grad.abs().sum() > 0


def test_apply_selects_mssa_or_ista_and_keeps_training_mode():
    model = _reference_model().train()
    model.transformer.layers[0][1].eval()
    report = apply_crate_kernels(model, mssa=False)
    assert {new for _old, new in report.swapped.values()} == {"ISTA"}
    assert all(isinstance(layer[0].fn, Attention) for layer in model.transformer.layers)
    assert not model.transformer.layers[0][1].fn.training and model.transformer.layers[1][1].fn.training
    report = apply_crate_kernels(model, ista=False)
    assert {new for _old, new in report.swapped.values()} == {"MSSA"}
    assert len(report.already_fused) == 0  # ISTA blocks are not MSSA: not counted when ista=False
    assert len(apply_crate_kernels(model).already_fused) == 6
    revert_crate_kernels(model)
    assert all(isinstance(layer[1].fn, FeedForward) for layer in model.transformer.layers)


def test_apply_swaps_overcomplete_blocks_and_shared_blocks_once():
    crate_kernels.set_backend("torch")
    torch.manual_seed(0)
    block = OvercompleteISTABlock(16).double()
    attn = Attention(16, heads=2, dim_head=8).double()
    model = nn.ModuleList([nn.Sequential(attn, block), nn.Sequential(attn, block)]).eval()  # shared twice
    x = torch.randn(2, 5, 16, generator=seeded(2), dtype=torch.float64)
    with torch.no_grad():
        expected = model[0](x)
    report = apply_crate_kernels(model)
    assert len(report.swapped) == 4
    assert model[0][0] is model[1][0] and model[0][1] is model[1][1], "a shared block must stay shared"
    assert isinstance(model[0][1], OvercompleteISTA)
    assert model[0][1].D is block.D and model[0][1].D1 is block.D1
    with torch.no_grad():
        assert_close_to_ref("patched overcomplete", model[0](x), expected)
    revert_crate_kernels(model)
    assert model[0][0] is attn and model[1][1] is block


def test_apply_on_upstream_crate_alpha_keeps_outputs():
    crate_kernels.set_backend("torch")
    torch.manual_seed(0)
    model = ref_crate_alpha.CRATE(
        image_size=8, patch_size=2, num_classes=10, dim=16, depth=2, heads=2, channels=1, dim_head=8
    )
    model = model.double().eval()
    images = torch.rand(2, 1, 8, 8, generator=seeded(3), dtype=torch.float64)
    with torch.no_grad():
        expected = model(images)
    report = apply_crate_kernels(model)
    assert sorted(set(report.swapped.values())) == [
        ("Attention", "MSSA"),
        ("OvercompleteISTABlock", "OvercompleteISTA"),
    ]
    assert model.transformer.layers[0][0].fn.to_out[0].bias is None  # the bias-free projection is kept as it is
    with torch.no_grad():
        assert_close_to_ref("patched CRATE-α", model(images), expected)


def test_apply_on_upstream_crate_lm_in_place():
    """crate-lm's own CausalSelfAttention and MLP are swapped in place: same Parameters, same keys, same logits."""
    crate_kernels.set_backend("torch")
    torch.manual_seed(0)
    config = ref_crate_lm.CRATEConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)
    model = ref_crate_lm.CRATE(config).eval()
    idx = torch.randint(50, (2, 16), generator=seeded(5))
    before_params, before_keys = _params(model), list(model.state_dict())
    with torch.no_grad():
        expected, _ = model(idx, targets=idx)
    report = apply_crate_kernels(model)
    assert set(report.swapped) == {f"transformer.h.{i}.{name}" for i in range(2) for name in ("attn", "ista")}
    assert sorted(set(report.swapped.values())) == [
        ("CausalSelfAttention", "CrateLMAttention"),
        ("MLP", "OvercompleteISTA"),
    ]
    attn, ista = model.transformer.h[0].attn, model.transformer.h[0].ista
    assert isinstance(attn, MSSA) and attn.is_causal and (attn.heads, attn.dim_head) == (2, 16)
    assert isinstance(ista, OvercompleteISTA) and ista.shared
    assert list(model.state_dict()) == before_keys
    assert (
        all(p is before_params[k] for k, p in _params(model).items()) and _params(model).keys() == before_params.keys()
    )
    with torch.no_grad():
        torch.testing.assert_close(model(idx, targets=idx)[0], expected, rtol=1e-5, atol=1e-5)
    revert_crate_kernels(model)
    assert type(model.transformer.h[1].attn).__name__ == "CausalSelfAttention"


def test_apply_skips_the_mae_decoders_synthesis_step():
    """Upstream's CRATE-MAE decoder calls its linear synthesis ``FeedForward`` (square weight, step_size, lambd):
    it comes first in its layer and must not become an ISTA step; the attention after it is plain MSSA."""
    crate_kernels.set_backend("torch")
    upstream_name = type("FeedForward", (ref_crate_mae.DecoderFeedForward,), {})
    torch.manual_seed(0)
    layer = nn.ModuleList(
        [ref_crate.PreNorm(16, upstream_name(16, 16)), ref_crate.PreNorm(16, Attention(16, heads=2, dim_head=8))]
    )
    model = nn.ModuleList([layer]).double()
    x = torch.randn(2, 5, 16, generator=seeded(4), dtype=torch.float64)

    def decode(x):
        y_half = layer[0](x)
        return y_half - layer[1](y_half)

    with torch.no_grad():
        expected = decode(x)
    report = apply_crate_kernels(model)
    assert report.swapped == {"0.1.fn": ("Attention", "MSSA")}
    with torch.no_grad():
        assert_close_to_ref("patched decoder layer", decode(x), expected)


def test_apply_leaves_crate_kernels_models_alone():
    model = crate_kernels.create_model("crate_demo", depth=2)
    report = apply_crate_kernels(model)
    assert report.swapped == {} and len(report.already_fused) == 4
    assert "0 module(s) swapped, 4 already fused" in str(report)
    assert revert_crate_kernels(model).swapped == {}


def test_apply_rejects_bad_arguments():
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        apply_crate_kernels("not a model")
    with pytest.raises(TypeError, match="mssa and ista must be bools"):
        apply_crate_kernels(nn.Linear(2, 2), mssa="yes")
