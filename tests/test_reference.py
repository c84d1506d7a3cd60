"""reference/ against hand-derived math and SDPA in fp64, and upstream's parameter counts."""

import pytest
import torch
import torch.nn.functional as F

from reference.crate import CRATE, CRATE_base, CRATE_large, CRATE_small, CRATE_tiny
from reference.ista import FeedForward, OvercompleteISTABlock, ista_overcomplete_ref, ista_ref
from reference.mssa import Attention, mssa_ref

f64 = torch.float64


def test_mssa_ref_matches_sdpa_fp64():
    w = torch.randn(2, 3, 17, 16, dtype=f64)
    mask = torch.rand(2, 1, 17, 17) > 0.3
    mask[0, 0, 4] = False  # a fully masked row: zero, as SDPA
    torch.testing.assert_close(mssa_ref(w), F.scaled_dot_product_attention(w, w, w), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        mssa_ref(w, is_causal=True), F.scaled_dot_product_attention(w, w, w, is_causal=True), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        mssa_ref(w, attn_mask=mask), F.scaled_dot_product_attention(w, w, w, attn_mask=mask), rtol=0, atol=1e-12
    )
    assert mssa_ref(w, attn_mask=mask)[0, :, 4].abs().max() == 0


def test_mssa_ref_key_padding_mask_is_per_batch():
    w = torch.randn(3, 2, 5, 8, dtype=f64)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 1, 0, 1]], dtype=torch.bool)
    out = mssa_ref(w, attn_mask=keep)
    for b in range(3):
        kept = w[b][:, keep[b], :]
        scores = torch.einsum("hnp,hmp->hnm", w[b], kept) * 8**-0.5
        torch.testing.assert_close(out[b], torch.softmax(scores, -1) @ kept, rtol=0, atol=1e-12)


def test_attention_module_by_hand():
    torch.manual_seed(0)
    attn = Attention(dim=12, heads=3, dim_head=4).double()
    x = torch.randn(2, 5, 12, dtype=f64)
    qkv_w, out_w, out_b = attn.qkv.weight, attn.to_out[0].weight, attn.to_out[0].bias
    expected = torch.empty(2, 5, 12, dtype=f64)
    for b in range(2):
        heads = []
        for h in range(3):
            w = x[b] @ qkv_w[4 * h : 4 * h + 4].T  # U_hᵀ x per token
            heads.append(torch.softmax(w @ w.T / 2.0, dim=-1) @ w)
        expected[b] = torch.cat(heads, dim=-1) @ out_w.T + out_b
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-12)
    assert isinstance(Attention(dim=8, heads=1, dim_head=8).to_out, torch.nn.Identity)


def test_ista_ref_is_one_proximal_gradient_step():
    x = torch.randn(4, 7, 24, dtype=f64)
    D = torch.randn(24, 24, dtype=f64) * 0.2
    eta, lam = 0.1, 0.3
    # gradient of ½‖x − z Dᵀ‖² style step written per token: z + η Dᵀ-weighted residual, then soft threshold ≥ 0
    expected = torch.clamp(x + eta * (x @ D - x @ D.T @ D) - eta * lam, min=0)
    torch.testing.assert_close(ista_ref(x, D, eta, lam), expected, rtol=0, atol=1e-12)
    ff = FeedForward(24, 24, step_size=eta).double()
    assert ff.lambd == 0.1 and ff.weight.abs().max() <= (6 / 24) ** 0.5
    torch.testing.assert_close(ff(x), ista_ref(x, ff.weight, eta, 0.1))


def test_ista_overcomplete_ref_two_steps():
    x = torch.randn(3, 5, 8, dtype=f64)
    D, D1 = torch.randn(8, 32, dtype=f64), torch.randn(8, 32, dtype=f64)
    residual = torch.randn(3, 5, 8, dtype=f64)
    eta, lam = 0.1, 0.2
    a1 = torch.clamp(eta * x @ D - eta * lam, min=0)
    a2 = torch.clamp(a1 + eta * (x - a1 @ D.T) @ D - eta * lam, min=0)
    torch.testing.assert_close(ista_overcomplete_ref(x, D, None, eta, lam), a2 @ D.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        ista_overcomplete_ref(x, D, D1, eta, lam, residual), a2 @ D1.T + residual, rtol=0, atol=1e-12
    )
    block = OvercompleteISTABlock(8).double()
    assert block.D.shape == block.D1.shape == (8, 32)


def _crate_by_hand(state: dict[str, torch.Tensor], img: torch.Tensor, depth: int, heads: int) -> torch.Tensor:
    """CRATE's forward written from the state_dict alone, for the upstream-equality check."""
    B, C, S, _ = img.shape
    p = 4
    patches = img.reshape(B, C, S // p, p, S // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, (S // p) ** 2, p * p * C)

    def ln(x, key):
        return F.layer_norm(x, x.shape[-1:], state[f"{key}.weight"], state[f"{key}.bias"], 1e-5)

    x = ln(patches, "to_patch_embedding.1")
    x = ln(x @ state["to_patch_embedding.2.weight"].T + state["to_patch_embedding.2.bias"], "to_patch_embedding.3")
    x = torch.cat([state["cls_token"].expand(B, 1, -1), x], dim=1) + state["pos_embedding"]
    dim = x.shape[-1]
    P = dim // heads
    for i in range(depth):
        pre = f"transformer.layers.{i}"
        w = (ln(x, f"{pre}.0.norm") @ state[f"{pre}.0.fn.qkv.weight"].T).view(B, -1, heads, P).transpose(1, 2)
        o = (torch.softmax(w @ w.transpose(-1, -2) * P**-0.5, -1) @ w).transpose(1, 2).reshape(B, -1, dim)
        x = x + o @ state[f"{pre}.0.fn.to_out.0.weight"].T + state[f"{pre}.0.fn.to_out.0.bias"]
        y, Dw = ln(x, f"{pre}.1.norm"), state[f"{pre}.1.fn.weight"]
        x = torch.relu(y + 0.1 * (y @ Dw - y @ Dw.T @ Dw) - 0.1 * 0.1)
    return ln(x[:, 0], "mlp_head.0") @ state["mlp_head.1.weight"].T + state["mlp_head.1.bias"]


def test_crate_matches_upstream_layout_state_dict_fp64():
    torch.manual_seed(0)
    model = CRATE(image_size=16, patch_size=4, num_classes=5, dim=24, depth=2, heads=3, dim_head=8).double()
    state = {k: torch.randn_like(v) * 0.3 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    img = torch.randn(2, 3, 16, 16, dtype=f64)
    torch.testing.assert_close(model(img), _crate_by_hand(state, img, depth=2, heads=3), rtol=0, atol=1e-10)


def test_crate_state_dict_keys_are_upstream():
    keys = set(CRATE(image_size=8, patch_size=4, num_classes=2, dim=8, depth=1, heads=2, dim_head=4).state_dict())
    assert keys == {
        "pos_embedding",
        "cls_token",
        "to_patch_embedding.1.weight",
        "to_patch_embedding.1.bias",
        "to_patch_embedding.2.weight",
        "to_patch_embedding.2.bias",
        "to_patch_embedding.3.weight",
        "to_patch_embedding.3.bias",
        "transformer.layers.0.0.norm.weight",
        "transformer.layers.0.0.norm.bias",
        "transformer.layers.0.0.fn.qkv.weight",
        "transformer.layers.0.0.fn.to_out.0.weight",
        "transformer.layers.0.0.fn.to_out.0.bias",
        "transformer.layers.0.1.norm.weight",
        "transformer.layers.0.1.norm.bias",
        "transformer.layers.0.1.fn.weight",
        "mlp_head.0.weight",
        "mlp_head.0.bias",
        "mlp_head.1.weight",
        "mlp_head.1.bias",
    }


# Paper Table 1 / upstream: CRATE-T 6.09M, S 13.12M, B 22.80M, L 77.64M parameters (ImageNet head).
@pytest.mark.parametrize(
    ("preset", "millions"),
    [(CRATE_tiny, 6.09), (CRATE_small, 13.12), (CRATE_base, 22.80), (CRATE_large, 77.64)],
    ids=["tiny", "small", "base", "large"],
)
def test_crate_preset_parameter_counts(preset, millions):
    with torch.device("meta"):
        model = preset()
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions
