"""crate_kernels.MSSA against reference.mssa.Attention: state_dict both ways, outputs and every gradient."""

import pytest
import torch

import crate_kernels
import crate_kernels.modules.mssa as mssa_module
from crate_kernels import MSSA
from reference.mssa import Attention, mssa_ref
from tests.models.helpers import assert_all_close, assert_exactly_close, outputs_and_grads, randomized
from tests.utils import BACKENDS, seeded

f64 = torch.float64


def _pair(dim=24, heads=3, dim_head=16):
    ref = Attention(dim, heads=heads, dim_head=dim_head)
    ref.load_state_dict(randomized(ref))
    ours = MSSA(dim, heads=heads, dim_head=dim_head)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def test_mssa_state_dict_round_trips_with_reference():
    ours, ref = _pair()
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["qkv.weight", "to_out.0.weight", "to_out.0.bias"]
    back = Attention(24, heads=3, dim_head=16)
    back.load_state_dict(ours.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    assert ours.heads == 3 and ours.scale == 16**-0.5


def test_mssa_matches_reference_fp64():
    crate_kernels.set_backend("torch")
    ours, ref = _pair()
    x = torch.randn(2, 17, 24, generator=seeded(0), dtype=f64)
    assert_exactly_close(outputs_and_grads(ours.double(), x), outputs_and_grads(ref.double(), x), atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mssa_matches_reference(backend):
    crate_kernels.set_backend(backend)
    ours, ref = _pair(dim=32, heads=2, dim_head=16)
    x = torch.randn(2, 19, 32, generator=seeded(0))
    low = outputs_and_grads(ref, x) if backend != "torch" else None
    expected = outputs_and_grads(ref.double(), x.double())
    assert_all_close(outputs_and_grads(ours, x), expected, low)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mssa_causal_and_mask(backend):
    crate_kernels.set_backend(backend)
    dim, heads, P = 32, 2, 16
    ours = MSSA(dim, heads=heads, dim_head=P, is_causal=True)
    x = torch.randn(2, 9, dim, generator=seeded(0))
    keep = torch.rand(2, 9, generator=seeded(1)) > 0.3
    keep[:, 0] = True  # every causal row keeps at least its first key

    def by_hand(x):
        w = ours.qkv(x).view(2, 9, heads, P).transpose(1, 2)
        o = mssa_ref(w.double(), is_causal=True, attn_mask=keep).to(x.dtype)
        return ours.to_out(o.transpose(1, 2).reshape(2, 9, heads * P))

    torch.testing.assert_close(ours(x, attn_mask=keep), by_hand(x), atol=1e-5, rtol=1e-5)


def test_mssa_core_reads_the_projection_view(monkeypatch):
    """forward hands the (B, H, N, P) transposed view of the qkv output to the op: same storage, no copy."""
    seen = {}

    def spy(w, **kwargs):
        seen["w"] = w
        return mssa_ref(w, kwargs["scale"], kwargs["is_causal"], kwargs["attn_mask"])

    monkeypatch.setattr(mssa_module, "mssa", spy)
    ours = MSSA(24, heads=3, dim_head=8)
    ours(torch.randn(2, 5, 24))
    w = seen["w"]
    assert w.shape == (2, 3, 5, 8) and not w.is_contiguous() and w.stride() == (5 * 24, 8, 24, 1)


def test_mssa_identity_out_and_no_bias():
    assert isinstance(MSSA(8, heads=1, dim_head=8).to_out, torch.nn.Identity)
    assert list(MSSA(8, heads=2, dim_head=4, out_bias=False).state_dict()) == ["qkv.weight", "to_out.0.weight"]


def test_mssa_attention_dropout_only_in_training():
    crate_kernels.set_backend("torch")
    ours, _ = _pair()
    dropped = MSSA(24, heads=3, dim_head=16, dropout=0.5)
    dropped.load_state_dict(ours.state_dict())
    x = torch.randn(2, 7, 24, generator=seeded(0))
    torch.testing.assert_close(dropped.eval()(x), ours(x))
    torch.manual_seed(0)
    assert not torch.allclose(dropped.train()(x), ours(x))


def test_mssa_repr_names_backend():
    crate_kernels.set_backend("torch")
    assert "backend='torch'" in repr(MSSA(8, heads=2, dim_head=4))
