"""The per-layer measurement against direct log-determinants and a hand-run forward.

docs/design.md, 'Measurement definitions'.
"""

import pytest
import torch
import torch.nn.functional as F

import crate_kernels
from crate_kernels import measure
from reference import crate as ref_crate
from reference import crate_alpha as ref_crate_alpha
from reference.ista import OvercompleteISTABlock
from tests.utils import seeded


def _direct_logdet(X: torch.Tensor, c: float) -> torch.Tensor:
    """logdet(I_N + c X Xᵀ) on the N×N matrix itself, as upstream's CodingRate computes it."""
    N = X.shape[-2]
    return torch.logdet(torch.eye(N, dtype=torch.float64) + c * X.double() @ X.double().mT)


@pytest.mark.parametrize("N,P", [(17, 8), (5, 16)], ids=["N>P", "N<P"])
def test_compression_term_matches_direct_logdet(N, P):
    w = torch.randn(3, 2, N, P, generator=seeded(0), dtype=torch.float64)
    X = w / w.norm(dim=-1, keepdim=True)  # upstream's normalisation, written independently
    expected = 0.5 * _direct_logdet(X, P / (N * 0.01)).sum(-1)
    torch.testing.assert_close(measure.compression_term(w), expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("N,D", [(9, 16), (40, 8)], ids=["N<D", "N>D"])
def test_coding_rate_matches_direct_logdet(N, D):
    z = torch.randn(2, N, D, generator=seeded(1), dtype=torch.float64)
    expected = 0.5 * torch.logdet(torch.eye(D, dtype=torch.float64) + D / (N * 0.01) * z.mT @ z)
    torch.testing.assert_close(measure.coding_rate(z), expected, rtol=1e-12, atol=1e-10)


def test_sparsity_counts_exact_zeros_per_sample():
    z = torch.tensor([[[0.0, 1.0], [0.0, 0.0]], [[2.0, 3.0], [1e-30, 0.0]]])
    torch.testing.assert_close(measure.sparsity(z), torch.tensor([0.75, 0.25], dtype=torch.float64))


def test_measure_math_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"w must have shape \(B, H, N, P\)"):
        measure.compression_term(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"z must have shape \(B, N, D\)"):
        measure.coding_rate(torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"z must be a torch\.Tensor"):
        measure.coding_rate([[1.0]])


def _tiny_reference(depth: int = 3) -> ref_crate.CRATE:
    torch.manual_seed(0)
    return ref_crate.CRATE(
        image_size=8, patch_size=2, num_classes=10, dim=16, depth=depth, heads=2, channels=1, dim_head=8
    )


def _hand_run(model: ref_crate.CRATE, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """The reference forward written out, recording each layer's input, MSSA projections and ISTA output."""
    x = model.to_patch_embedding(images)
    z = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + model.pos_embedding
    out = []
    for attn, ff in model.transformer.layers:
        B, N, _ = z.shape
        w = attn.fn.qkv(attn.norm(z)).view(B, N, attn.fn.heads, -1).transpose(1, 2)
        z_half = attn(z) + z
        code = ff(z_half)
        out.append({"z": z, "w": w, "code": code})
        z = code
    return out


def test_layerwise_matches_a_hand_run_forward():
    model = _tiny_reference().double().train()
    images = torch.rand(5, 1, 8, 8, generator=seeded(2), dtype=torch.float64)
    rows = measure.layerwise(model, images)
    with torch.no_grad():
        expected = _hand_run(model, images)
    assert [r["layer"] for r in rows] == [1, 2, 3]  # the paper's ℓ = 1..L
    for row, exp in zip(rows, expected, strict=True):
        X = F.normalize(exp["w"], dim=-1)
        P, N = X.shape[-1], X.shape[-2]
        rc = 0.5 * _direct_logdet(X, P / (N * 0.01)).sum(-1)
        D = exp["z"].shape[-1]
        rz = 0.5 * _direct_logdet(exp["z"].mT, D / (N * 0.01))  # logdet(I_D + c zᵀz), transposed into the helper
        zeros = (exp["code"] == 0).flatten(1).double().mean(1)
        assert row["compression"] == pytest.approx(rc.mean().item(), rel=1e-10)
        assert row["compression_std"] == pytest.approx(rc.std(correction=0).item(), rel=1e-8, abs=1e-10)
        assert row["coding_rate"] == pytest.approx(rz.mean().item(), rel=1e-10)
        assert row["sparsity"] == pytest.approx(zeros.mean().item(), abs=1e-12)
        assert 0.0 < row["sparsity"] < 1.0
    # no hook left behind, training mode restored
    assert model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_layerwise_measures_the_sparse_code_of_overcomplete_blocks():
    """A model whose ISTA blocks are overcomplete: the sparsity is that of the code a₂, recomputed from the block's
    own dictionary (the block's output, a dense synthesis, has no exact zeros)."""
    model = _tiny_reference(depth=2).double()
    for _attn, ff in model.transformer.layers:
        ff.fn = OvercompleteISTABlock(16).double()
    images = torch.rand(3, 1, 8, 8, generator=seeded(3), dtype=torch.float64)
    captured = []
    handle = model.transformer.layers[1][1].fn.register_forward_hook(lambda m, a, o: captured.append(a[0]))
    rows = measure.layerwise(model, images)
    handle.remove()
    blk, y = model.transformer.layers[1][1].fn, captured[0]
    a1 = torch.relu(blk.eta * y @ blk.D - blk.eta * blk.lmbda)
    a2 = torch.relu(a1 - blk.eta * (a1 @ blk.D.T - y) @ blk.D - blk.eta * blk.lmbda)  # upstream's form of step 2
    assert rows[1]["sparsity"] == pytest.approx((a2 == 0).double().mean().item(), abs=1e-12)
    assert rows[1]["sparsity"] > 0.0


def test_layerwise_is_the_same_on_our_crate_alpha_and_upstreams():
    """Our OvercompleteISTA (code recomputed through ``dictionaries()``) and upstream's block measure alike."""
    crate_kernels.set_backend("torch")
    ours = crate_kernels.create_model("crate_alpha_demo", depth=2).double()
    shared = ("image_size", "patch_size", "num_classes", "dim", "depth", "heads", "channels", "dim_head")
    upstream = ref_crate_alpha.CRATE(**{k: ours.config[k] for k in shared}).double()
    upstream.load_state_dict(ours.state_dict())
    images = torch.rand(4, 1, 8, 8, generator=seeded(7), dtype=torch.float64)
    ours_rows, upstream_rows = measure.layerwise(ours, images), measure.layerwise(upstream, images)
    for a, b in zip(ours_rows, upstream_rows, strict=True):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12)
    assert ours_rows[-1]["sparsity"] > 0.0


def test_attention_maps_are_the_cls_row_on_the_patch_grid():
    model = _tiny_reference().double()
    images = torch.rand(2, 1, 8, 8, generator=seeded(4), dtype=torch.float64)
    maps = measure.attention_maps(model, images, layer=-1)
    assert maps.shape == (2, 2, 4, 4)
    with torch.no_grad():
        w = _hand_run(model, images)[-1]["w"]
        attn = torch.softmax(w @ w.mT * model.transformer.layers[-1][0].fn.scale, dim=-1)
    torch.testing.assert_close(maps.double(), attn[:, :, 0, 1:].reshape(2, 2, 4, 4), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layer must be in"):
        measure.attention_maps(model, images, layer=3)


def test_layerwise_rejects_a_model_without_crate_layers():
    with pytest.raises(ValueError, match="no CRATE layer"):
        measure.layerwise(torch.nn.Linear(3, 3), torch.zeros(1, 3))


def test_attention_maps_of_the_vit_are_its_last_layers_cls_row():
    model = crate_kernels.create_model("vit_demo", depth=2).double().eval()
    images = torch.rand(2, 1, 8, 8, generator=seeded(5), dtype=torch.float64)
    attn = model.transformer.layers[-1][0]
    with torch.no_grad():
        tokens = model.dropout(
            torch.cat((model.cls_token.expand(2, -1, -1), model.embed_patches(images)), 1) + model.pos_embedding
        )
        first_attn, first_mlp = model.transformer.layers[0]
        tokens = tokens + first_attn(tokens)
        y = attn.norm(tokens + first_mlp(tokens))
        q, k = attn.fn.queries_keys(y)
        expected = torch.softmax(q @ k.mT * attn.fn.scale, dim=-1)[:, :, 0, 1:].reshape(2, 4, 4, 4)
    torch.testing.assert_close(measure.attention_maps(model, images), expected)
